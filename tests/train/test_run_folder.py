"""Run folders that no second writer can spoil: one writer at a time (a killed holder leaves no
stale lock), a finished run never replaced without --resume or --overwrite, and readers never
mix the files of two saves."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from safetensors import safe_open

from difflab.cli import main
from difflab.pipeline import Pipeline
from difflab.train import train
from difflab import runfolder
from difflab.runfolder import LOCK_NAME, RunFolderError, RunLock, atomic_save_safetensors, read_safetensors
from tests.train.helpers import subprocess_env, tiny_config

FILES = ("checkpoint.safetensors", "model.safetensors", "config.json", "log.jsonl")


def _digests(run):
    return {n: hashlib.sha256((run / n).read_bytes()).hexdigest() for n in FILES if (run / n).exists()}


@pytest.fixture
def run(tiny_run, tmp_path):
    return shutil.copytree(tiny_run, tmp_path / "run")


def test_a_second_writer_is_refused_naming_the_first_and_touches_nothing(run):
    before = _digests(run)
    stray = run / ".model.safetensors.abcd1234.tmp"  # the first writer's save in progress
    stray.write_bytes(b"half a file")
    with RunLock(run):
        with pytest.raises(RunFolderError, match=rf"run folder {run} is being written by process {os.getpid()} on "):
            train(tiny_config(steps=5), run, resume=True, progress=False)
        with pytest.raises(RunFolderError, match="is being written by process"):
            train(tiny_config(steps=5), run, overwrite=True, progress=False)
    assert _digests(run) == before and stray.exists()  # its temp file was not "cleaned up" either
    train(tiny_config(steps=4), run, resume=True, progress=False)  # free again once released


def test_a_killed_holder_leaves_no_stale_lock(run):
    code = (
        "import sys, time; from difflab.runfolder import RunLock\n"
        f"l = RunLock({str(run)!r}).__enter__(); print('held', flush=True); time.sleep(60)"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=subprocess_env(), text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match=f"process {p.pid} on"):
            train(tiny_config(steps=4), run, resume=True, progress=False)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
    assert (run / LOCK_NAME).exists()  # the file stays; the kernel dropped the lock with its holder
    train(tiny_config(steps=4), run, resume=True, progress=False)
    assert json.loads((run / "config.json").read_text())["saved_step"] == 4


def test_an_existing_run_is_never_replaced_without_resume_or_overwrite(run, capsys):
    before = _digests(run)
    with pytest.raises(RunFolderError, match="already holds a run .* --resume, .* --overwrite"):
        train(tiny_config(steps=2), run, progress=False)
    assert _digests(run) == before
    rc = main(["train", "--data", "digits", "--model", "unet-xs", "--steps", "2", "--out", str(run), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "already holds a run" in err[0] and _digests(run) == before
    with pytest.raises(ValueError, match="resume and overwrite contradict"):
        train(tiny_config(steps=2), run, resume=True, overwrite=True, progress=False)
    # --overwrite replaces it whole: the log holds only the new run's rows
    train(tiny_config(steps=2, seed=5), run, overwrite=True, progress=False)
    rows = [json.loads(r) for r in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 5


def test_a_failed_first_write_leaves_no_folder(tmp_path):
    with pytest.raises(ValueError, match="needs captions"):  # found under the lock, after the folder was made
        train(tiny_config(conditioning="text"), tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()


def _meta_step(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["step"]


def test_the_files_of_one_save_name_the_same_step(run):
    config = json.loads((run / "config.json").read_text())
    assert (
        str(config["saved_step"]) == _meta_step(run / "model.safetensors") == _meta_step(run / "checkpoint.safetensors")
    )


def test_a_reader_never_mixes_two_saves(run, monkeypatch):
    # a writer killed between model.safetensors (step 9) and config.json (still step 3)
    tensors, meta = read_safetensors(run / "model.safetensors")
    atomic_save_safetensors(tensors, run / "model.safetensors", metadata={**meta, "step": "9"})
    monkeypatch.setattr(runfolder, "SAVE_WAIT_TRIES", 2)
    with pytest.raises(
        ValueError,
        match=r"caught between two saves: model.safetensors is from step 9, config.json "
        r"from step 3.*difflab train --resume",
    ):
        Pipeline.from_pretrained(run)
    # a live writer: config.json of the same save lands while the reader waits
    config = json.loads((run / "config.json").read_text())
    monkeypatch.setattr(runfolder, "SAVE_WAIT_TRIES", 20)

    def finish_the_save():
        time.sleep(0.5)
        (run / "config.json").write_text(json.dumps({**config, "saved_step": 9}))

    t = threading.Thread(target=finish_the_save)
    t.start()
    pipe = Pipeline.from_pretrained(run)
    t.join()
    assert pipe.config["saved_step"] == 9


def test_train_autoencoder_refuses_an_existing_folder(tmp_path, capsys):
    out = tmp_path / "ae"
    args = [
        "train-autoencoder",
        "--data",
        "digits",
        "--steps",
        "1",
        "--batch-size",
        "8",
        "--channels",
        "8",
        "--factor",
        "2",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(args) == 2
    assert f"{out} already holds an autoencoder (config.json, model.safetensors)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert main(args + ["--overwrite"]) == 0
