"""Rollout records on disk: one msgpack file per rollout batch, never pickle.

A file is one msgpack map:
    {"format": "dsray-rollout", "version": 1, "meta": {...},
     "tensors": {key: {"dtype": "int64", "shape": [B, T], "data": <raw little-endian bytes>}},
     "values": {key: int | float | str | bool | None | list of those}}
Tensors and plain values live in separate maps, so nothing has to guess whether a map is a tensor.

Typical batch keys (any others may be added):
    ids              [B, S] int64     prompt + completion, right-padded
    completion_mask  [B, S-1] bool    next-token positions whose target was generated (trained on)
    rewards          [B] float32
    logprobs         [B, S-1] float32 the sampled tokens' log-probs at rollout time (0 where unmasked)
    routing          [B, S, n_moe_layers, top_k] uint8 | int16  logical expert ids chosen per position
                                      (rollout routing replay: the update reuses the rollout's experts)
    advantages       [B] float32
    group_size, step int

Writes are atomic (temp file + fsync + rename); every malformed file raises ValueError naming it.
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import msgpack
import numpy as np
import torch

MAGIC = "dsray-rollout"
VERSION = 1

# name -> (torch dtype, integer dtype of the same width used to move the bytes). Bytes go through
# an integer view because numpy has no bfloat16; the '<' numpy type fixes the byte order on any host.
_DTYPES: dict[str, tuple[torch.dtype, torch.dtype, str]] = {
    "bool": (torch.bool, torch.uint8, "<u1"),
    "uint8": (torch.uint8, torch.uint8, "<u1"),
    "int8": (torch.int8, torch.uint8, "<u1"),
    "int16": (torch.int16, torch.int16, "<i2"),
    "int32": (torch.int32, torch.int32, "<i4"),
    "int64": (torch.int64, torch.int64, "<i8"),
    "float16": (torch.float16, torch.int16, "<i2"),
    "bfloat16": (torch.bfloat16, torch.int16, "<i2"),
    "float32": (torch.float32, torch.int32, "<i4"),
    "float64": (torch.float64, torch.int64, "<i8"),
}
_NAME_OF = {t: name for name, (t, _, _) in _DTYPES.items()}
_FILE_RE = re.compile(r"^rollout-(\d{6,})\.msgpack$")

Batch = dict[str, Any]


def _encode_tensor(key: str, t: torch.Tensor) -> dict[str, Any]:
    name = _NAME_OF.get(t.dtype)
    if name is None:
        raise ValueError(f"batch[{key!r}]: dtype {t.dtype} is not storable; use one of {sorted(_DTYPES)}")
    _, int_dtype, np_type = _DTYPES[name]
    # reshape(-1) first: view() to another dtype is not allowed on 0-d tensors
    flat = t.detach().cpu().contiguous().reshape(-1).view(int_dtype)
    data = np.asarray(flat.numpy(), dtype=np_type).tobytes()
    return {"dtype": name, "shape": list(t.shape), "data": data}


def _check_value(where: str, v: Any) -> None:
    if v is None or isinstance(v, (bool, str, float)):
        return
    if isinstance(v, int):
        if not -2**63 <= v < 2**64:  # msgpack's integer range
            raise ValueError(f"{where}: int {v} does not fit in 64 bits")
        return
    if isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            _check_value(f"{where}[{i}]", x)
        return
    raise ValueError(f"{where}: {type(v).__name__} is not storable (tensors at the top level of the batch; "
                     "otherwise int, float, str, bool, None or lists of those)")


def _check_meta(where: str, v: Any) -> None:
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: key {k!r} is not a str")
            _check_meta(f"{where}[{k!r}]", x)
    elif isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            _check_meta(f"{where}[{i}]", x)
    else:
        _check_value(where, v)


def encode_rollout(batch: Batch, meta: dict[str, Any] | None = None) -> bytes:
    """The msgpack bytes `write_rollout` stores (tensors copied to CPU)."""
    if not isinstance(batch, dict):
        raise ValueError(f"batch: expected a dict, got {type(batch).__name__}")
    tensors, values = {}, {}
    for key, v in batch.items():
        if not isinstance(key, str):
            raise ValueError(f"batch: key {key!r} is not a str")
        if isinstance(v, torch.Tensor):
            tensors[key] = _encode_tensor(key, v)
        else:
            _check_value(f"batch[{key!r}]", v)
            values[key] = v
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise ValueError(f"meta: expected a dict or None, got {type(meta).__name__}")
    _check_meta("meta", meta)
    return msgpack.packb({"format": MAGIC, "version": VERSION, "meta": meta, "tensors": tensors,
                          "values": values}, use_bin_type=True)


def write_rollout(path: str | os.PathLike, batch: Batch, meta: dict[str, Any] | None = None) -> Path:
    """Write `batch` (str keys -> tensor | int | float | str | bool | None | list) and `meta` to `path`
    atomically: readers see the old file or the complete new one, never a partial one. Tuples come
    back as lists."""
    path = Path(path)
    blob = encode_rollout(batch, meta)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())  # data on disk before the rename publishes it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sys.platform != "win32":  # the rename itself is durable only once the folder is synced
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


def _decode_tensor(where: str, rec: Any) -> torch.Tensor:
    if not isinstance(rec, dict) or set(rec) != {"dtype", "shape", "data"}:
        raise ValueError(f"{where}: expected a map with dtype, shape, data")
    name, shape, data = rec["dtype"], rec["shape"], rec["data"]
    if name not in _DTYPES:
        raise ValueError(f"{where}: unknown dtype {name!r} (known: {sorted(_DTYPES)})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative ints")
    if not isinstance(data, bytes):
        raise ValueError(f"{where}: data is {type(data).__name__}, expected bytes")
    dtype, int_dtype, np_type = _DTYPES[name]
    need = math.prod(shape) * np.dtype(np_type).itemsize
    if len(data) != need:
        raise ValueError(f"{where}: {len(data)} bytes of data, but dtype {name} x shape {shape} needs {need}")
    arr = np.frombuffer(data, dtype=np_type).astype(np_type[1:], copy=True)  # native order, writable
    if name == "bool" and arr.size and arr.max() > 1:
        raise ValueError(f"{where}: bool data holds bytes other than 0 and 1")
    return torch.from_numpy(arr).view(dtype).reshape(shape)


def decode_rollout(blob: bytes, source: str = "<bytes>") -> tuple[Batch, dict[str, Any]]:
    """(batch, meta) from the bytes of a rollout file; errors name `source`."""
    try:
        doc = msgpack.unpackb(blob, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as e:  # truncated, garbage, bad utf-8, ...
        raise ValueError(f"{source}: not a readable msgpack file ({type(e).__name__}: {e})") from e
    if not isinstance(doc, dict) or doc.get("format") != MAGIC:
        raise ValueError(f"{source}: not a dsray rollout file (no format={MAGIC!r} field)")
    if type(doc.get("version")) is not int or doc["version"] != VERSION:  # True == 1 in python
        raise ValueError(f"{source}: rollout format version {doc.get('version')!r}, this reader knows {VERSION}")
    tensors, values, meta = doc.get("tensors"), doc.get("values"), doc.get("meta")
    for name, v in (("tensors", tensors), ("values", values), ("meta", meta)):
        if not isinstance(v, dict):
            raise ValueError(f"{source}: field {name!r} is {type(v).__name__}, expected a map")
    batch: Batch = {k: _decode_tensor(f"{source}: tensor {k!r}", rec) for k, rec in tensors.items()}
    both = set(batch) & set(values)
    if both:
        raise ValueError(f"{source}: keys {sorted(both)} are both tensors and values")
    batch.update(values)
    return batch, meta


def read_rollout(path: str | os.PathLike) -> tuple[Batch, dict[str, Any]]:
    """(batch, meta) as written by `write_rollout`, tensors bit-identical (on CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rollout file {str(path)!r} does not exist (or is not a file)")
    return decode_rollout(path.read_bytes(), str(path))


class RolloutWriter:
    """Numbered rollout files in one folder: rollout-000001.msgpack, rollout-000002.msgpack, ...

    Numbering continues after the highest file already there, so a restarted run appends instead of
    overwriting."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"rollout folder {str(self.folder)!r} exists and is not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.next_index = max((n for n, _ in _numbered(self.folder)), default=0) + 1

    def write(self, batch: Batch, meta: dict[str, Any] | None = None) -> Path:
        path = self.folder / f"rollout-{self.next_index:06d}.msgpack"
        write_rollout(path, batch, meta)
        self.next_index += 1
        return path


def _numbered(folder: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _FILE_RE.match(p.name))]
    return sorted(found)


def iter_rollouts(folder: str | os.PathLike) -> Iterator[tuple[Path, Batch, dict[str, Any]]]:
    """(path, batch, meta) of every rollout-NNNNNN.msgpack in `folder`, in number order. Other files
    (and the writer's hidden temp files) are ignored; the listing is taken when iteration starts."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"rollout folder {str(folder)!r} does not exist (or is not a folder)")
    for _, path in _numbered(folder):
        batch, meta = read_rollout(path)
        yield path, batch, meta
