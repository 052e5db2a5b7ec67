"""A minutes budget counted in CPU time of the process (`clock="cpu"`): the fair budget on a shared
machine. The run stops once its own CPU time passes the budget, and says so in its log."""

import json
import time

import pytest

from difflab.train import TrainConfig, train
from difflab.runfolder import read_safetensors
from tests.train.helpers import tiny_config


def test_cpu_clock_budget_stops_on_process_time(tmp_path):
    budget_s = 1.5
    cfg = tiny_config(steps=None, minutes=budget_s / 60, clock="cpu", log_every=1)
    cpu0 = time.process_time()
    out = train(cfg, tmp_path / "run", progress=False)
    used = time.process_time() - cpu0
    _, meta = read_safetensors(out / "checkpoint.safetensors")
    elapsed = float(meta["elapsed"])
    assert budget_s - 1e-3 <= elapsed <= used + 1e-3  # stopped after the budget, charged no more than it used
    rows = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
    assert rows and all(r["clock"] == "cpu" for r in rows)
    assert rows[-1]["time"] <= elapsed + 1e-3  # log times are on the same (CPU) clock (elapsed is stored to ms)
    assert int(meta["step"]) == rows[-1]["step"] > 1


def test_unknown_clock_is_a_clear_error():
    with pytest.raises(ValueError, match="clock must be 'wall' or 'cpu', got 'gpu'"):
        TrainConfig(clock="gpu").validate()
