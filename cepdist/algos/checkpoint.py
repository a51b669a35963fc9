"""Checkpoints that load with torch.load(weights_only=True): tensors, numbers, strings, lists and dicts only."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch


def save(path: str | os.PathLike, **payload: Any) -> Path:
    """Write atomically (a temporary file of a unique name, then rename): a crash never leaves a truncated
    checkpoint, and two writers of the same path never share a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)
