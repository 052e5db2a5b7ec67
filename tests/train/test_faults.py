"""Faults at the worst moments: SIGKILL during the write of each checkpoint file, and two
`difflab train` processes started on one folder at once."""

import json
import signal
import subprocess
import sys

import pytest
import torch

from difflab.pipeline import Pipeline
from difflab import runfolder
from difflab.train import train
from difflab.runfolder import read_safetensors
from tests.train.helpers import REPO, run_tensors, subprocess_env, tiny_config, write_config

STEPS, SAVE_EVERY, KILL_AT_SAVE = 9, 3, 2  # killed in the second save (step 6)

# run in a child: SIGKILL itself at the moment the second save writes `target` -- after its
# temporary file is complete, before the rename that publishes it (the widest window there is)
_CHILD = """
import os, signal, sys
import difflab.runfolder as ck
target, at = sys.argv[1], int(sys.argv[2])
seen = {"n": 0}
real_replace = os.replace
def replace(src, dst, *a, **k):
    if os.path.basename(dst) == target:
        seen["n"] += 1
        if seen["n"] == at:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *a, **k)
ck.os.replace = replace
from difflab.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("target", ["checkpoint.safetensors", "model.safetensors", "config.json"])
def test_sigkill_during_each_file_of_a_save(tmp_path, target, monkeypatch):
    cfg = tiny_config(steps=STEPS, save_every=SAVE_EVERY, log_every=1)
    config_path = write_config(cfg, tmp_path / "cfg.json")
    run = tmp_path / "run"
    argv = ["train", "--config", str(config_path), "--out", str(run), "--no-progress"]
    p = subprocess.run(
        [sys.executable, "-c", _CHILD, target, str(KILL_AT_SAVE), *argv],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=REPO,
        timeout=300,
    )
    assert p.returncode == -signal.SIGKILL, p.stderr
    leftovers = sorted(q.name for q in run.glob(".*.tmp"))
    assert len(leftovers) == 1 and target in leftovers[0]  # the unpublished file; nothing else touched

    # what a reader sees: the previous save whole, or (killed between the weights and config.json)
    # an error that says so and how to repair it -- never weights and a config of different saves
    monkeypatch.setattr(runfolder, "SAVE_WAIT_TRIES", 2)
    steps = {read_safetensors(run / n)[1]["step"] for n in ("checkpoint.safetensors", "model.safetensors")}
    if target == "config.json":
        assert steps == {"6"} and json.loads((run / "config.json").read_text())["saved_step"] == 3
        with pytest.raises(ValueError, match="caught between two saves.*difflab train --resume"):
            Pipeline.from_pretrained(run)
    else:
        Pipeline.from_pretrained(run)  # consistent: model.safetensors and config.json of step 3

    # resumed, it ends bit for bit where an uninterrupted run does, and leaves no temporary file
    train(cfg, run, resume=True, progress=False)  # in this process, one thread as the child
    reference = train(cfg, tmp_path / "reference", progress=False)
    got, want = run_tensors(run), run_tensors(reference)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert not list(run.glob(".*.tmp"))
    assert Pipeline.from_pretrained(run).config["saved_step"] == STEPS


def test_two_writers_started_at_once(tmp_path):
    cfg = tiny_config(steps=15, save_every=5)
    config_path = write_config(cfg, tmp_path / "cfg.json")
    run = tmp_path / "run"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "difflab",
                "train",
                "--config",
                str(config_path),
                "--out",
                str(run),
                "--no-progress",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
            cwd=REPO,
        )
        for _ in range(2)
    ]
    results = [(p.wait(300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2).strip().splitlines()
    assert len(loser) == 1 and ("is being written by process" in loser[0] or "already holds a run" in loser[0])
    # the winner's run is whole: its log counts every step once, and it equals a lone run
    rows = [json.loads(r)["step"] for r in (run / "log.jsonl").read_text().splitlines()]
    assert rows == sorted(set(rows)) and rows[-1] == 15
    want = run_tensors(train(cfg, tmp_path / "alone", progress=False))
    got = run_tensors(run)
    assert all(torch.equal(got[k], want[k]) for k in want)
