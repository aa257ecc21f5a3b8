"""Reading the JSON files users hand us (config.json, index files, router statistics): never pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(file: Path, what: str) -> dict[str, Any]:
    """The JSON object in `file`; ValueError naming the file and `what` it should be otherwise."""
    try:
        obj = json.loads(Path(file).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: malformed {what} JSON: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{file}: malformed {what}: expected a JSON object, got {type(obj).__name__}")
    return obj
