"""Read a Hugging Face safetensors checkpoint (single file or sharded index) into tensors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open


def checkpoint_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in model folder {str(folder)!r}")
    return files


def load_state_dict(folder: str | Path, dtype: torch.dtype,
                    device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, by its Hugging Face name, cast to `dtype` on `device`
    (safetensors reads each tensor straight to the device; the cast happens there)."""
    state: dict[str, torch.Tensor] = {}
    for path in _existing(folder):
        with safe_open(str(path), framework="pt", device=device) as f:
            for name in f.keys():
                state[name] = f.get_tensor(name).to(dtype)
    return state


def checkpoint_numel(folder: str | Path) -> int:
    """How many values the checkpoint holds, from the files' headers (nothing is loaded)."""
    total = 0
    for path in _existing(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total


def _existing(folder: str | Path) -> list[Path]:
    files = checkpoint_files(folder)
    for path in files:
        if not path.is_file():
            raise ValueError(f"checkpoint shard {str(path)!r} is missing")
    return files
