"""Checkpoints written per rank, read per rank: expert state never funnels through the job driver.

`Engine.save(path)` stages a sibling folder (dsray.checkpoint.staged_folder: the old checkpoint stays
intact until the new one is complete, then two renames publish it). Into it, in parallel:
    driver rank 0    model-00001-of-0000N.safetensors       dense weights + the Router's bias
                     optimizer-00001-of-0000N.safetensors   their AdamW moments
    shard j          model-0000{j+2}-of-0000N.safetensors   its experts (a replicated expert: its first copy)
                     optimizer-0000{j+2}-of-0000N.safetensors
and the job driver writes only small JSON: `model.safetensors.index.json` and
`optimizer.safetensors.index.json` (key -> file, HF's format) from the key lists the ranks return,
config.json, generation_config.json, dsray_router.json, dsray_state.json. The folder must be on a
filesystem every node sees (as Ray Train's storage_path); a rank that cannot see it fails the save.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dsray.checkpoint import CheckpointError, write_index, write_json, write_part
from dsray.files import read_json_object

OPTIM_INDEX = "optimizer.safetensors.index.json"
OPTIM_SINGLE = "optimizer.safetensors"  # checkpoints written before per-rank saving


def part_names(index: int, total: int) -> tuple[str, str]:
    return (f"model-{index + 1:05d}-of-{total:05d}.safetensors",
            f"optimizer-{index + 1:05d}-of-{total:05d}.safetensors")


def write_rank_part(folder: Path, index: int, total: int, tensors: dict[str, torch.Tensor],
                    optim_step: int) -> dict[str, Any]:
    """Split `tensors` into weights and moments and write this rank's two files into the staged folder."""
    if not folder.is_dir():
        raise RuntimeError(f"save: staged folder {folder} is not visible from this rank's node "
                           f"({os.uname().nodename}); save to a filesystem every node mounts")
    model_name, optim_name = part_names(index, total)
    weights = {k: v for k, v in tensors.items() if not k.endswith((".exp_avg", ".exp_avg_sq"))}
    moments = {k: v for k, v in tensors.items() if k not in weights}
    out = {"weights": write_part(folder / model_name, weights) if weights else {}, "model_file": model_name,
           "optim": write_part(folder / optim_name, moments) if moments else {}, "optim_file": optim_name,
           "optim_step": optim_step}
    return out


def write_indexes(folder: Path, parts: list[dict[str, Any]], params: int) -> None:
    weight_map = {k: p["model_file"] for p in parts for k in p["weights"]}
    write_index(folder, weight_map, {k: n for p in parts for k, n in p["weights"].items()}, params=params)
    optim_map = {k: p["optim_file"] for p in parts for k in p["optim"]}
    if optim_map:
        write_index(folder, optim_map, {k: n for p in parts for k, n in p["optim"].items()}, name=OPTIM_INDEX)


def has_optimizer(folder: str | os.PathLike) -> bool:
    return (Path(folder) / OPTIM_INDEX).exists() or (Path(folder) / OPTIM_SINGLE).exists()


def read_optimizer(folder: str | os.PathLike, keys: list[str]) -> dict[str, torch.Tensor]:
    """The AdamW moments among `keys` that the checkpoint holds (each rank reads only its own)."""
    from safetensors import safe_open

    folder = Path(folder)
    if (folder / OPTIM_INDEX).exists():
        wm = read_json_object(folder / OPTIM_INDEX, "optimizer index").get("weight_map")
        if not isinstance(wm, dict):
            raise CheckpointError(f"{folder / OPTIM_INDEX}: expected a 'weight_map' object")
    elif (folder / OPTIM_SINGLE).exists():
        with safe_open(folder / OPTIM_SINGLE, framework="pt") as f:
            wm = {k: OPTIM_SINGLE for k in f.keys()}
    else:
        return {}
    by_file: dict[str, list[str]] = {}
    for k in keys:
        if k in wm:
            by_file.setdefault(wm[k], []).append(k)
    out: dict[str, torch.Tensor] = {}
    for name, ks in by_file.items():
        if Path(name).name != name or not (folder / name).is_file():
            raise CheckpointError(f"{folder / OPTIM_INDEX}: names file {name!r}, which is not in the folder")
        with safe_open(folder / name, framework="pt") as f:
            for k in ks:
                out[k] = f.get_tensor(k)
    return out


def write_metadata(folder: Path, config: dict[str, Any], generation: dict[str, Any], router: dict[str, Any],
                   state: dict[str, Any]) -> None:
    write_json(folder / "config.json", config)
    write_json(folder / "generation_config.json", generation)
    write_json(folder / "dsray_router.json", router)
    write_json(folder / "dsray_state.json", state)
