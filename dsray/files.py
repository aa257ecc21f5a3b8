"""Files users hand us and files we write for them: read JSON without pickle, never lose what a folder held.

Rules every writer follows (checkpoints, reports, rollout records, demo runs):
- Read: user-supplied JSON through `read_json_object` (errors name the file); tensors only via safetensors.
- Write: into a temporary sibling, fsync, then one rename into place, so a crash leaves the old file or
  folder intact and never a half-written one. Published files get the usual 0666 & ~umask mode.
- Replace: an existing file or checkpoint folder is replaced only when the caller says `overwrite`, and a
  folder only if everything in it is something dsray writes (`check_checkpoint_target`): a folder holding
  a user's notes, data or another tool's checkpoint is never deleted, with or without overwrite.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

# What a dsray checkpoint folder may hold: HF layout + our JSON sidecars + optimizer state + rank parts.
_CHECKPOINT_FILES = re.compile(
    r"^(config\.json|generation_config\.json|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
    r"|dsray_[a-z_]+\.json|optimizer(-\d{5}-of-\d{5})?\.safetensors|optimizer\.safetensors\.index\.json"
    r"|(model|optimizer)-rank\d+\.safetensors)$")


def read_json_object(file: Path, what: str) -> dict[str, Any]:
    """The JSON object in `file`; ValueError naming the file and `what` it should be otherwise."""
    try:
        obj = json.loads(Path(file).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: malformed {what} JSON: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{file}: malformed {what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def default_mode() -> int:
    """0666 & ~umask: what `open(..., "w")` would give. mkstemp and safetensors write 0600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_path(path: Path) -> None:
    # Data must be on disk before the rename that publishes it, or a crash can leave empty files.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_new_file(path: str | os.PathLike, overwrite: bool, what: str) -> Path:
    """`path` may be written: it does not exist, or it is a file and `overwrite` is set."""
    p = Path(path)
    if p.exists():
        if p.is_dir():
            raise FileExistsError(f"{what} {p} is a folder; give a file name")
        if not overwrite:
            raise FileExistsError(f"{what} {p} exists; pass --overwrite (overwrite=True) to replace it")
    return p


def write_file_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """`write(f)` into a temp sibling, fsync, rename onto `path` (readers see the old or the new file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def foreign_entries(folder: Path) -> list[str]:
    """Names in `folder` that a dsray checkpoint does not consist of (hidden temp names excluded)."""
    return sorted(p.name for p in folder.iterdir()
                  if not p.name.startswith(".") and not (p.is_file() and _CHECKPOINT_FILES.match(p.name)))


def check_checkpoint_target(folder: str | os.PathLike, overwrite: bool) -> Path:
    """`folder` may receive a checkpoint: absent, empty, or (with `overwrite`) a dsray checkpoint and
    nothing else. Raises FileExistsError naming the folder and what is in the way."""
    p = Path(folder)
    if not p.exists():
        return p
    if not p.is_dir():
        raise FileExistsError(f"{p} exists and is not a folder")
    if not any(p.iterdir()):
        return p
    foreign = foreign_entries(p)
    if foreign:
        raise FileExistsError(f"{p} exists and is not empty, and it is not a dsray checkpoint (it holds {', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}); choose another folder")
    if not overwrite:
        raise FileExistsError(f"{p} exists and is not empty (a checkpoint); pass --overwrite (overwrite=True) "
                              "to replace it")
    return p
