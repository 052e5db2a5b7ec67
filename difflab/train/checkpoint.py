"""Run folders: `from_pretrained`-style inference files and an atomic, resumable checkpoint.

A run folder holds

    config.json              everything needed to rebuild the network, schedule and denoiser
    model.safetensors        the EMA weights (what sampling uses)
    checkpoint.safetensors   raw + EMA weights and optimizer state, with the step in metadata
    log.jsonl, loss.png      training log and loss curve

Every file is written to a temporary name in the same folder and renamed over the old one
(`os.replace` is atomic on POSIX), so a run killed at any instant leaves the previous complete
checkpoint. Only safetensors and JSON are read back: no pickles.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = ["atomic_write_bytes", "atomic_save_safetensors", "write_json", "read_json", "read_safetensors",
           "remove_stale_temps", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "difflab-checkpoint-1"


def _tmp_in(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    _usual_mode(tmp)
    return tmp


def _usual_mode(path: str) -> None:
    """mkstemp (and safetensors' writer) make 0600 files; give the file the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


_TMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what _tmp_in makes: .NAME.XXXXXXXX.tmp


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a process killed mid-write left in `folder`; return them."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file() and _TMP_NAME.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = _tmp_in(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = _tmp_in(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        _usual_mode(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON file with a clear error for a missing or corrupt one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is this a difflab run folder?)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupt or foreign") from e


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, with a clear error for truncated/foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or foreign?): {e}") from e
    return tensors, metadata
