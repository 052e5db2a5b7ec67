"""Atomic checkpoint writes: an interrupted write leaves the previous checkpoint whole and no temp files."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import difflab.runfolder as checkpoint
from difflab.pipeline import Pipeline
from difflab.train import train
from difflab.runfolder import atomic_save_safetensors, remove_stale_temps
from tests.train.helpers import tiny_config


class _Interrupted(Exception):
    pass


def _save_half_then_fail(tensors, filename, metadata=None):
    """safetensors' save_file that dies half-way through writing its file."""
    save_file(tensors, filename, metadata=metadata)
    with open(filename, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    raise _Interrupted("killed mid-write")


def test_interrupted_checkpoint_write_keeps_previous_checkpoint(tiny_run, tmp_path, monkeypatch):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    before = {name: (run / name).read_bytes() for name in ("checkpoint.safetensors", "model.safetensors")}
    monkeypatch.setattr(checkpoint, "save_file", _save_half_then_fail)
    with pytest.raises(_Interrupted):  # resume and train 2 more steps: the first save dies
        train(tiny_config(steps=5), run, resume=True, progress=False)
    for name, data in before.items():
        assert (run / name).read_bytes() == data, f"{name} changed"
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"
    monkeypatch.undo()
    assert Pipeline.from_pretrained(run)(2, class_labels=[0, 1], steps=2).isfinite().all()
    train(tiny_config(steps=5), run, resume=True, progress=False)  # and the run goes on from step 3


def test_atomic_save_replaces_whole_file_and_cleans_stale_temps(tmp_path):
    path = tmp_path / "x.safetensors"
    atomic_save_safetensors({"a": torch.zeros(3)}, path, metadata={"step": "1"})
    atomic_save_safetensors({"a": torch.ones(3)}, path, metadata={"step": "2"})
    assert torch.equal(load_file(str(path))["a"], torch.ones(3))
    stale = checkpoint._tmp_in(path)  # what a SIGKILL mid-write leaves
    unrelated = tmp_path / ".notes.tmp"
    unrelated.write_text("not ours")
    assert [p.name for p in remove_stale_temps(tmp_path)] == [stale.rsplit("/", 1)[-1]]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", "x.safetensors"]
