"""Run folders, the bottom layer every writer and reader of a model folder goes through: read
(`read_run`, `read_json`, `read_safetensors`), write (`write_run_save`, atomic files), validate
(`validate_run_config`: a config.json is untrusted input) and lock (`RunLock`). It imports
nothing of difflab: train/, methods/, the pipeline and the metrics all stand on it.

A run folder holds

    config.json              everything needed to rebuild the network, schedule and denoiser
    model.safetensors        the EMA weights (what sampling uses)
    checkpoint.safetensors   raw + EMA weights and optimizer state, with the step in metadata
    log.jsonl, loss.png      training log and loss curve

Every file is written to a temporary name in the same folder and renamed over the old one
(`os.replace` is atomic on POSIX), so a run killed at any instant leaves the previous complete
checkpoint. The three files of one save carry the same `save_id` (safetensors metadata and
config.json), so a reader can tell a folder caught between two saves from a consistent one. One
writer at a time: `RunLock` (an flock on RUN/.difflab.lock, which the kernel releases when the
holder dies, so a killed run leaves no stale lock). Only safetensors and JSON are read back: no
pickles.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

__all__ = [
    "atomic_write_bytes",
    "atomic_save_safetensors",
    "write_json",
    "read_json",
    "read_safetensors",
    "remove_stale_temps",
    "CHECKPOINT_FORMAT",
    "RunLock",
    "RunFolderError",
    "check_new_folder",
    "LOCK_NAME",
    "new_folder",
    "read_run",
    "validate_run_config",
    "write_run_save",
    "WEIGHT_FILES",
]

CHECKPOINT_FORMAT = "difflab-checkpoint-1"
LOCK_NAME = ".difflab.lock"


class RunFolderError(ValueError):
    """A run folder that cannot be written now: held by another writer, or holding a finished run."""


class RunLock:
    """Exclusive write access to a run folder, for one process at a time.

        with RunLock("runs/x"):       # a second writer gets RunFolderError naming this one
            ...

    An flock on RUN/.difflab.lock: the kernel drops it when the holder exits or is killed, so
    there is never a stale lock to clean up; the file names the holder (pid, host, start time)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            return self
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except (ValueError, UnicodeDecodeError):
                holder = {}
            os.close(fd)
            who = (
                f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('started')})"
                if holder
                else "another process"
            )
            raise RunFolderError(
                f"run folder {self.folder} is being written by {who}; wait for it to end or write elsewhere (--out)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            ).encode(),
            0,
        )
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            import fcntl

            if self._created and [p.name for p in self.folder.iterdir()] == [LOCK_NAME]:
                (self.folder / LOCK_NAME).unlink()  # a failed first write leaves no empty folder behind
                self.folder.rmdir()
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def check_new_folder(
    folder: str | os.PathLike,
    *,
    overwrite: bool = False,
    what: str = "a run",
    files: tuple[str, ...] = ("config.json", "model.safetensors", "checkpoint.safetensors"),
) -> bool:
    """Before any work: refuse to replace a folder that already holds a `what` (one of `files`)
    unless `overwrite`; refuse a path that is a file. Returns whether one was there."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{folder} is a file, not a folder")
    found = [name for name in files if (folder / name).exists()]
    if found and not overwrite:
        raise RunFolderError(
            f"{folder} already holds {what} ({', '.join(found)}); continue it with --resume, "
            f"replace it with --overwrite, or write elsewhere"
        )
    return bool(found)


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


@contextlib.contextmanager
def new_folder(
    folder: str | os.PathLike,
    *,
    overwrite: bool = False,
    what: str = "a model",
    files: tuple[str, ...] = ("config.json", "model.safetensors"),
):
    """`check_new_folder`, then hold `RunLock` on the folder (checked again under the lock) while
    the body trains and writes it."""
    check_new_folder(folder, overwrite=overwrite, what=what, files=files)
    with RunLock(folder):
        check_new_folder(folder, overwrite=overwrite, what=what, files=files)
        yield Path(folder)


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


def atomic_save_safetensors(
    tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """safetensors' save_file through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = _tmp_in(path)
    try:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        except SafetensorError as e:  # an I/O failure (full disk, file-size limit) as the OSError it is
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
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
    except RecursionError:
        raise ValueError(
            f"{path} is nested too deeply to be a difflab config; the file is corrupt or foreign"
        ) from None


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, with a clear error for truncated/foreign files.

    Reads the bytes and parses them with `safetensors.torch.load`: its `load_file` (0.8.0) keeps
    ~10 KB per call alive, which a process loading checkpoints in a loop (bench/soak.py's reader)
    grew by without bound."""
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        data = path.read_bytes()
        if len(data) < 8:
            raise ValueError(f"{len(data)} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(data[:8], "little")
        if n > len(data) - 8:
            raise ValueError(f"header of {n} bytes in a file of {len(data)}")
        header = json.loads(data[8 : 8 + n])
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("__metadata__ is not a map of strings")
        tensors = load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or foreign?): {e}") from None
    return tensors, metadata


# --------------------------------------------------------------------------------------------
# A diffusion run folder: config.json + model.safetensors (EMA) + checkpoint.safetensors
# --------------------------------------------------------------------------------------------

WEIGHT_FILES = {"ema": "model.safetensors", "raw": "checkpoint.safetensors"}
SAVE_WAIT_TRIES = 10  # x 0.2 s: how long `read_run` waits for a writer to finish a save


def write_run_save(
    out: str | os.PathLike,
    step: int,
    *,
    checkpoint: dict[str, Tensor],
    checkpoint_meta: dict[str, str],
    weights: dict[str, Tensor],
    config: dict,
) -> None:
    """One save of a run: checkpoint.safetensors (everything `--resume` needs), model.safetensors
    (the weights sampling uses) and config.json, in that order, each atomic, all three naming
    `step`. config.json goes last: a reader that finds another step in the weights caught the
    folder between two saves (`read_run` waits for the writer, or says so)."""
    out = Path(out)
    atomic_save_safetensors(checkpoint, out / WEIGHT_FILES["raw"], metadata={**checkpoint_meta, "step": str(step)})
    atomic_save_safetensors(
        weights, out / WEIGHT_FILES["ema"], metadata={"format": CHECKPOINT_FORMAT, "step": str(step)}
    )
    write_json(out / "config.json", {**config, "saved_step": step})


def validate_run_config(config: Any, config_path: Path) -> dict:
    """A config.json read from a folder, checked before anything is built from it: a difflab run's
    format, the fields a run needs with the right types, image geometry within bounds."""
    if isinstance(config, dict) and config.get("kind") in ("autoencoder", "classifier", "clip"):
        kind = config["kind"]
        raise ValueError(
            f"{config_path.parent} is {'an' if kind[0] in 'aeiou' else 'a'} {kind} folder, not a "
            "diffusion run (`difflab train` writes those)"
        )
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT or "model" not in config:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_path} is not a difflab run config (format {found!r})")
    missing = [k for k in ("model", "schedule", "prediction", "data") if k not in config]
    if missing:
        raise ValueError(f"{config_path} lacks the field(s) {missing} of a difflab run config; the file is damaged")
    wrong = [
        k
        for k, kind in (("model", dict), ("schedule", dict), ("prediction", str), ("data", dict))
        if not isinstance(config[k], kind)
    ]
    if wrong:
        raise ValueError(f"{config_path}: the field(s) {wrong} have the wrong type; the file is damaged")
    wrong = [
        k
        for k in ("text_encoder", "autoencoder", "train")
        if config.get(k) not in (None, {}) and not isinstance(config.get(k), dict)
    ]
    if wrong:
        raise ValueError(f"{config_path}: the section(s) {wrong} must be JSON objects; the file is damaged")
    d = config["data"]
    if any(
        not isinstance(d.get(k), int) or isinstance(d.get(k), bool) or not 1 <= d[k] <= 4096
        for k in ("channels", "size")
    ):
        raise ValueError(
            f"{config_path}: data must name the images' channels and size as integers in 1 .. 4096, got {d!r}"
        )
    return config


def read_run(run: str | os.PathLike, weights: str = "ema") -> tuple[dict, dict[str, Tensor], Path]:
    """(config.json, the tensors of `weights` -- "ema": model.safetensors, "raw": checkpoint.safetensors
    --, that file's path) of a run folder, both of one save: a folder caught between two saves
    is waited for, and reported if no writer finishes it."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist")
    if weights not in WEIGHT_FILES:
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    config_path, path = run / "config.json", run / WEIGHT_FILES[weights]
    for attempt in range(SAVE_WAIT_TRIES):
        config = validate_run_config(read_json(config_path), config_path)
        tensors, meta = read_safetensors(path)
        saved = config.get("saved_step")
        if saved is None or meta.get("step") is None or str(saved) == meta["step"]:
            return config, tensors, path
        if attempt < SAVE_WAIT_TRIES - 1:
            time.sleep(0.2)
    raise ValueError(
        f"{run} is caught between two saves: {path.name} is from step {meta['step']}, config.json "
        f"from step {saved}. Is a training writing it? A run killed in the middle of a save is "
        "repaired by `difflab train --resume`"
    )
