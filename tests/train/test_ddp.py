"""Two-process DDP (torchrun, gloo on CPU) trains the same weights as one process on the same global batch."""

import subprocess
import sys

import torch

from difflab.train import train
from difflab.train.loop import _new_denoiser, load_training_data
from tests.train.helpers import REPO, log_rows, run_tensors, subprocess_env, tiny_config, write_config

SCRIPT = """
import json, sys
from difflab.train import TrainConfig, train
train(TrainConfig.from_dict(json.load(open(sys.argv[1]))), sys.argv[2], progress=False)
"""


def _flat(state: dict, keys: list[str]) -> torch.Tensor:
    return torch.cat([state[k].double().flatten() for k in keys])


def test_two_process_ddp_equals_one_process(tmp_path):
    # global batch 16 = 2 micro-batches of 8 (gradient accumulation: DDP's no_sync path), each
    # split 4 + 4 between the two ranks; against one process taking the 16 at once.
    ddp_cfg = tiny_config(steps=4, batch_size=16, grad_accum=2, lr=1e-3, warmup=1)
    one_cfg = tiny_config(steps=4, batch_size=16, grad_accum=1, lr=1e-3, warmup=1)
    (tmp_path / "train.py").write_text(SCRIPT)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            str(tmp_path / "train.py"),
            str(write_config(ddp_cfg, tmp_path / "cfg.json")),
            str(tmp_path / "ddp"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(),
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = train(one_cfg, tmp_path / "single", progress=False)

    got, want = run_tensors(tmp_path / "ddp"), run_tensors(single)
    assert sorted(got) == sorted(want)
    # Adam scales every update to ~lr whatever the gradient's size, so float noise in a gradient
    # near zero (at first, everything upstream of the zero-initialised output conv) moves a weight
    # by a small fraction of lr: atol is a tenth of one step. A rank that trained on its half
    # alone, or drew its own noise, is off by whole steps (~lr) in most weights.
    for k in want:
        if not k.startswith("optim."):
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    # as a whole: the two runs' weights differ by < 1e-3 of the distance either one trained
    torch.manual_seed(one_cfg.seed)  # as train() does before building the network
    init = _new_denoiser(one_cfg, load_training_data(one_cfg)).net.state_dict()
    keys = sorted(init)
    w_init, w_ddp, w_one = (
        _flat(init, keys),
        _flat(got, ["model." + k for k in keys]),
        _flat(want, ["model." + k for k in keys]),
    )
    assert (w_ddp - w_one).norm() < 1e-3 * (w_one - w_init).norm()
    # the logged loss is the global batch's (both ranks' shares), as one process logs it
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in log_rows(tmp_path / "ddp")]),
        torch.tensor([r["loss"] for r in log_rows(single)]),
        rtol=1e-5,
        atol=0,
    )
