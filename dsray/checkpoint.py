"""HF safetensors checkpoint I/O in the official DeepSeek-V3 key layout, generic over keys.

Reading is lazy: a key's shard is opened only when that key is read, and headers are parsed by hand
(8-byte little-endian length + JSON) so `keys()`/`shape()` never touch tensor data. FP8 e4m3 weights
with a `weight_scale_inv` companion (fp32, one scale per 128x128 block) are dequantized on load.
Writing is atomic: everything goes into a temporary sibling, which is renamed into place when complete.
Nothing here ever unpickles (no torch.load, no pickle): a pickled checkpoint can run arbitrary code.

Shape legend: O = out features (rows), I = in features (cols), nO/nI = number of blocks along each.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from pathlib import Path

import torch

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dsray.fp8 import check_block, dequantize_fp8_blockwise, scale_shape
from dsray.files import check_checkpoint_target, default_mode, fsync_path, read_json_object

# Stored dtypes we read. F8_E5M2 is left out on purpose: V3 has no scale convention for it, so
# reading it "as stored" would silently hand back unscaled weights.
_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "I64", "I32", "I16", "I8", "U8", "BOOL")
_SCALE_SUFFIX = ".weight_scale_inv"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit; a bigger length prefix means a corrupt file


class CheckpointError(ValueError):
    """A checkpoint's content is wrong or unreadable: missing key, bad dtype, corrupt header, NaN/Inf."""


# ---------------------------------------------------------------- reading

def _read_header(file: Path) -> dict[str, dict]:
    """Parse a safetensors header without touching tensor data: {key: {dtype, shape, data_offsets}}."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < n <= min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(f"{file}: corrupt safetensors header (file is {size} bytes, "
                                  f"header length prefix says {n})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header: expected a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    for key, info in header.items():
        try:
            begin, end = info["data_offsets"]
            ok = (isinstance(info["dtype"], str) and all(isinstance(d, int) for d in info["shape"])
                  and 0 <= begin <= end <= data_len)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{file}: corrupt safetensors header: bad entry for {key!r} "
                                  f"(or the file is truncated: {data_len} data bytes)")
    return header


_load_json = read_json_object


def _pickle_refusal(where: Path, names: list[str]) -> ValueError:
    return ValueError(f"{where}: found {', '.join(names)} but no .safetensors weights. dsray never "
                      "unpickles checkpoints (torch.load can run arbitrary code); convert them to "
                      "safetensors first, e.g. with transformers: from_pretrained(...).save_pretrained(dst)")


class CheckpointReader:
    """A HF safetensors checkpoint: a folder with model.safetensors, or sharded model-0000i-of-0000n.safetensors
    + model.safetensors.index.json, or a single .safetensors file path. Reads tensors lazily by name: only the
    shard holding a key is opened (safetensors safe_open / get_slice), nothing else is materialised."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"checkpoint path {self.path} does not exist")
        self._headers: dict[Path, dict[str, dict]] = {}
        self._index: Path | None = None
        if self.path.is_file():
            folder = self.path.parent
            if self.path.name.endswith(".safetensors.index.json"):
                self._key_file = self._load_index(self.path)
            elif self.path.suffix == ".safetensors":
                self._key_file = self._scan([self.path])
            elif self.path.suffix in _PICKLE_SUFFIXES:
                raise _pickle_refusal(self.path, [self.path.name])
            else:
                raise ValueError(f"{self.path}: expected a .safetensors file, a *.safetensors.index.json "
                                 "or a folder holding them")
        else:
            folder = self.path
            indexes = ([folder / _INDEX] if (folder / _INDEX).is_file()
                       else sorted(folder.glob("*.safetensors.index.json")))
            if len(indexes) > 1:
                raise ValueError(f"{folder}: several index files {[p.name for p in indexes]}; pass one of them")
            if indexes:
                self._key_file = self._load_index(indexes[0])
            elif (folder / _SINGLE).is_file():
                self._key_file = self._scan([folder / _SINGLE])
            elif files := sorted(folder.glob("*.safetensors")):  # shards without an index
                self._key_file = self._scan(files)
            elif pickles := sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES):
                raise _pickle_refusal(folder, pickles)
            else:
                raise FileNotFoundError(f"{folder}: no .safetensors weights and no {_INDEX}")
        cfg = folder / "config.json"
        self.config_dict: dict | None = _load_json(cfg, "config") if cfg.is_file() else None
        self._block = self._block_size(cfg)

    def _block_size(self, cfg: Path) -> tuple[int, int]:
        qc = (self.config_dict or {}).get("quantization_config") or {}
        try:
            return check_block(tuple(qc.get("weight_block_size", (128, 128))))  # 128x128: the V3 default
        except (TypeError, ValueError) as e:
            raise ValueError(f"{cfg}: quantization_config.weight_block_size: {e}") from e

    def _load_index(self, index: Path) -> dict[str, Path]:
        self._index = index
        weight_map = _load_json(index, "index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: malformed index: expected \"weight_map\": {{tensor name: shard file}}")
        key_file = {k: index.parent / v for k, v in weight_map.items()}
        for shard in sorted(set(key_file.values())):  # fail now, not halfway through a load
            if not shard.is_file():
                raise FileNotFoundError(f"{index} names shard {shard.name!r}, but {shard} does not exist")
        return key_file

    def _scan(self, files: list[Path]) -> dict[str, Path]:
        key_file: dict[str, Path] = {}
        for file in files:
            for key in self._header(file):
                if key in key_file:
                    raise CheckpointError(f"tensor {key!r} is stored twice: in {key_file[key]} and {file}")
                key_file[key] = file
        return key_file

    def _header(self, file: Path) -> dict[str, dict]:
        if file not in self._headers:
            self._headers[file] = _read_header(file)
        return self._headers[file]

    def keys(self) -> list[str]:
        """Logical tensor keys, sorted; FP8 `*.weight_scale_inv` companions are applied, not listed."""
        return sorted(k for k in self._key_file if not k.endswith(_SCALE_SUFFIX))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and not key.endswith(_SCALE_SUFFIX) and key in self._key_file

    def file_of(self, key: str) -> Path:
        """The shard file that stores `key`."""
        if key not in self:
            hint = difflib.get_close_matches(key, self.keys(), n=3)
            why = ("is an FP8 scale companion, applied when its weight is read" if key.endswith(_SCALE_SUFFIX)
                   else f"not found among {len(self.keys())} tensors")
            raise CheckpointError(f"{self.path}: tensor {key!r} {why}"
                                  + (f"; did you mean {', '.join(map(repr, hint))}?" if hint else ""))
        return self._key_file[key]

    def _info(self, key: str, file: Path) -> dict:
        info = self._header(file).get(key)
        if info is None:
            raise CheckpointError(f"{file}: tensor {key!r} is listed in {self._index} "
                                  "but not stored in this file")
        return info

    def shape(self, key: str) -> tuple[int, ...]:
        """Logical shape (for an FP8 weight: the weight's shape, not its scale's)."""
        return tuple(self._info(key, self.file_of(key))["shape"])

    def dtype_name(self, key: str) -> str:
        """Stored dtype as safetensors names it ("BF16", "F32", "F8_E4M3", ...)."""
        return self._info(key, self.file_of(key))["dtype"]

    def _plan(self, key: str) -> str | None:
        """Validate `key` before any data is read; return its scale companion's key if it is FP8."""
        file = self.file_of(key)
        info = self._info(key, file)
        dt, shape = info["dtype"], tuple(info["shape"])
        if dt not in _DTYPES:
            raise CheckpointError(f"{file}: tensor {key!r} has dtype {dt}, which dsray does not read "
                                  f"(supported: {', '.join(_DTYPES)})")
        scale_key = key.removesuffix(".weight") + _SCALE_SUFFIX if key.endswith(".weight") else None
        has_scale = scale_key is not None and scale_key in self._key_file
        if dt != "F8_E4M3":
            if has_scale:  # e.g. fp8 values upcast without applying the scale: reading as-is would be wrong
                raise CheckpointError(f"{file}: tensor {key!r} is stored as {dt} but has a {scale_key!r} "
                                      "companion, which only F8_E4M3 weights may have")
            return None
        if not has_scale:
            raise CheckpointError(f"{file}: tensor {key!r} is stored as F8_E4M3 but has no "
                                  f"'{key.removesuffix('.weight')}{_SCALE_SUFFIX}' scale companion")
        scale_file = self._key_file[scale_key]
        scale_info = self._info(scale_key, scale_file)
        expected = scale_shape(shape, self._block) if len(shape) == 2 else None
        if expected is None or tuple(scale_info["shape"]) != expected:
            bo, bi = self._block
            raise CheckpointError(f"{scale_file}: {scale_key!r} has shape {tuple(scale_info['shape'])}, "
                                  f"expected {expected} for {key!r} of shape {shape} with {bo}x{bi} blocks")
        if scale_info["dtype"] not in ("F32", "BF16", "F16", "F64"):
            raise CheckpointError(f"{scale_file}: {scale_key!r} has dtype {scale_info['dtype']}, expected F32")
        return scale_key

    def get(self, key: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
            *, check_finite: bool = True) -> torch.Tensor:
        """Read one tensor. FP8 weights are dequantized (fp32 unless `dtype`); `dtype` casts floating
        tensors only (ints/bools come back as stored). NaN/Inf raise CheckpointError when check_finite."""
        return self.get_many([key], dtype, device, check_finite=check_finite)[key]

    def get_many(self, keys: Iterable[str], dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu", *, check_finite: bool = True) -> dict[str, torch.Tensor]:
        """Read several tensors, in the order asked, opening each shard file once (see `get`)."""
        keys = list(dict.fromkeys(keys))
        scales = {k: self._plan(k) for k in keys}  # every key validated before reading any data
        by_file: dict[Path, list[str]] = {}
        for k, s in scales.items():
            by_file.setdefault(self._key_file[k], []).append(k)
            if s is not None:
                by_file.setdefault(self._key_file[s], []).append(s)
        raw: dict[str, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for file, names in by_file.items():
            try:
                with safe_open(file, framework="pt", device="cpu") as f:
                    for name in names:
                        raw[name] = f.get_tensor(name)
            except SafetensorError as e:
                raise CheckpointError(f"{file}: cannot read safetensors data: {e}") from e
            # finish keys whose parts are all read, so raw tensors don't pile up across shards
            for k in [k for k in scales if k in raw and (scales[k] is None or scales[k] in raw)]:
                out[k] = self._finish(k, raw.pop(k), raw.pop(scales[k]) if scales[k] else None,
                                      dtype, device, check_finite)
                del scales[k]
        assert not scales and not raw, (scales.keys(), raw.keys())
        return {k: out[k] for k in keys}

    def _finish(self, key: str, t: torch.Tensor, scale: torch.Tensor | None,
                dtype: torch.dtype | None, device: str | torch.device, check_finite: bool) -> torch.Tensor:
        if scale is not None:
            t = dequantize_fp8_blockwise(t, scale, self._block)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        # checked on the host, after dequant and cast: what the caller gets is what is checked
        if check_finite and t.is_floating_point() and not (finite := torch.isfinite(t)).all():
            raise CheckpointError(f"{self._key_file[key]}: tensor {key!r} has {int((~finite).sum())} "
                                  f"NaN/Inf values of {t.numel()} (as {t.dtype})")
        return t.to(device)


# ---------------------------------------------------------------- writing

def _check_tensors(tensors: Mapping[str, torch.Tensor]) -> None:
    for key, t in tensors.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"tensor names must be non-empty strings, got {key!r}")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{key!r}: expected a torch.Tensor, got {type(t).__name__}")
        if t.is_meta:
            raise ValueError(f"{key!r}: is on the meta device and has no data to save")


def _prepare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous; a second tensor on an already-used storage is cloned, because safetensors
    refuses tensors that share memory (tied weights, views of one buffer)."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(ptr)
        out[key] = t
    return out


def write_json(path: Path, obj: object) -> None:
    # HF's layout (indent 2, sorted keys, trailing newline); NaN is not JSON, so refuse it
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    fsync_path(path)


@contextlib.contextmanager
def staged_folder(folder: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling of `folder` to write a checkpoint into; published on success, removed on error.

    Publishing is two renames, not one (rename() cannot replace a non-empty folder): the old folder is
    moved aside, the new one renamed in, the old one deleted; if the second rename fails the old one is
    put back. `folder` therefore always holds a complete checkpoint, the old or the new. Several
    processes (expert shards, driver rank 0) may write their own files into the staged folder."""
    folder = Path(folder)
    check_checkpoint_target(folder, overwrite)  # never replaces a folder holding anything but a checkpoint
    folder.parent.mkdir(parents=True, exist_ok=True)
    # a uuid name rather than mkdtemp: mkdtemp's 0700 mode would stick to the published folder
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old: Path | None = None
    try:
        yield tmp
        fsync_path(tmp)
        check_checkpoint_target(folder, overwrite)  # again: something may have appeared meanwhile
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(folder, old)
            try:
                os.rename(tmp, folder)
            except BaseException:
                os.rename(old, folder)
                old = None
                raise
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # cleanup only; the error itself propagates
        raise
    if old is not None:
        shutil.rmtree(old)


def write_part(file: Path, tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """One safetensors file of a staged checkpoint (mode 0666 & ~umask, fsynced); returns {key: bytes}."""
    _check_tensors(tensors)
    save_file(_prepare(tensors), file, metadata={"format": "pt"})
    os.chmod(file, default_mode())  # safetensors writes 0600; config.json gets the umask's mode
    fsync_path(file)
    return {k: t.numel() * t.element_size() for k, t in tensors.items()}


def write_index(folder: Path, weight_map: Mapping[str, str], sizes: Mapping[str, int],
                name: str = _INDEX, params: int | None = None) -> None:
    """`model.safetensors.index.json` (HF's format) for parts already written into `folder`."""
    meta: dict[str, int] = {"total_size": int(sum(sizes.values()))}
    if params is not None:
        meta["total_parameters"] = int(params)
    write_json(folder / name, {"metadata": meta, "weight_map": dict(weight_map)})


def save_checkpoint(state: Mapping[str, torch.Tensor], folder: str | os.PathLike, config_dict: dict | None = None,
                    *, max_shard_bytes: int = 5 * 2**30, extra_json: Mapping[str, dict] | None = None,
                    overwrite: bool = False) -> Path:
    """Write a HF-layout checkpoint folder atomically and return its path.

    One `model.safetensors` when everything fits in `max_shard_bytes`, else `model-0000i-of-0000N.safetensors`
    + `model.safetensors.index.json` (keys kept in `state` order; a tensor bigger than the limit gets its
    own shard). `config.json` and each `extra_json` file are written beside them. Everything is written
    into a temporary sibling folder first (`staged_folder`); `folder` only ever holds a complete checkpoint."""
    folder = Path(folder)
    _check_tensors(state)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    check_json_names(extra_json or {})
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    n = len(shards)
    names = [_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    with staged_folder(folder, overwrite) as tmp:
        sizes: dict[str, int] = {}
        for name, keys in zip(names, shards):
            # prepared one shard at a time so at most one shard's CPU copies exist at once
            sizes.update(write_part(tmp / name, {k: state[k] for k in keys}))
        if n > 1:
            write_index(tmp, {k: name for name, keys in zip(names, shards) for k in keys}, sizes,
                        params=sum(t.numel() for t in state.values()))
        if config_dict is not None:
            write_json(tmp / "config.json", config_dict)
        for name, obj in (extra_json or {}).items():
            write_json(tmp / name, obj)
    return folder


def check_json_names(extra_json: Mapping[str, Any]) -> None:
    for name in extra_json:
        if Path(name).name != name or name.startswith(".") or not name.endswith(".json") \
                or name in ("config.json", _INDEX):
            raise ValueError(f"extra_json name {name!r} must be a plain *.json file name other than "
                             f"config.json and {_INDEX}")


def save_tensors(tensors: Mapping[str, torch.Tensor], file: str | os.PathLike) -> Path:
    """Write one .safetensors file atomically (temp file + rename), replacing `file` if it exists."""
    file = Path(file)
    _check_tensors(tensors)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.parent / f".{file.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        save_file(_prepare(tensors), tmp, metadata={"format": "pt"})
        os.chmod(tmp, default_mode())
        fsync_path(tmp)
        os.replace(tmp, file)  # atomic: readers see the old file or the new one, never a partial one
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return file
