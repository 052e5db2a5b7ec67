"""Exact resume: a run SIGKILLed mid-way and resumed ends bit for bit where an uninterrupted run does."""

import os
import signal
import subprocess
import sys
import time

import torch

from difflab.train import train
from difflab.runfolder import read_safetensors
from tests.train.helpers import REPO, log_rows, run_tensors, subprocess_env, tiny_config, write_config

STEPS, SAVE_EVERY = 40, 5


def _start_cli_train(config_path, out, *extra):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "difflab",
            "train",
            "--config",
            str(config_path),
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        cwd=REPO,
    )


def test_resume_after_sigkill_equals_uninterrupted_run_bit_for_bit(tmp_path):
    cfg = tiny_config(steps=STEPS, save_every=SAVE_EVERY, log_every=1)
    config_path = write_config(cfg, tmp_path / "cfg.json")
    killed = tmp_path / "killed"

    # ---- run 1: killed (SIGKILL: no cleanup at all) once a first checkpoint exists ----------
    proc = _start_cli_train(config_path, killed)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint.safetensors").exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"training exited ({proc.returncode}) before its first checkpoint:\n{proc.stderr.read()}"
            )
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    _, meta = read_safetensors(killed / "checkpoint.safetensors")
    killed_at = int(meta["step"])
    assert SAVE_EVERY <= killed_at < STEPS, f"the kill did not land mid-run (checkpoint at step {killed_at})"

    # ---- run 1, resumed to the same budget --------------------------------------------------
    resumed = _start_cli_train(config_path, killed, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err

    # ---- run 2: uninterrupted, in this process (one thread, as the subprocesses) -----------
    reference = train(cfg, tmp_path / "reference", progress=False)

    got, want = run_tensors(killed), run_tensors(reference)
    assert sorted(got) == sorted(want)
    assert any(k.startswith("optim.") for k in want) and any(k.startswith("ema.") for k in want)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:5]}"
    assert read_safetensors(killed / "checkpoint.safetensors")[1]["step"] == str(STEPS)

    # the log continues: every step once, in order, with the uninterrupted run's losses
    rows, ref_rows = log_rows(killed), log_rows(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
    assert not list(killed.glob(".*.tmp")), "temporary files left behind"
