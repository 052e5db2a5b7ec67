"""Gradient accumulation equals the full batch; bf16 autocast trains."""

import math

import torch

from difflab.train import train
from tests.train.helpers import log_rows, run_tensors, tiny_config


def test_grad_accumulation_equals_full_batch(tmp_path):
    # batch 16 as 2 micro-batches of 8 against 16 at once: the same samples, sigmas and noise.
    full = run_tensors(train(tiny_config(steps=4, grad_accum=1, lr=1e-3), tmp_path / "full", progress=False))
    accum = run_tensors(train(tiny_config(steps=4, grad_accum=2, lr=1e-3), tmp_path / "accum", progress=False))
    # atol: a tenth of one Adam step (lr), see test_ddp; a wrong average (e.g. the last micro-batch
    # only, or a sum of means under grad clipping) is off by whole steps.
    for k in full:
        if not k.startswith("optim."):
            torch.testing.assert_close(accum[k], full[k], rtol=1e-4, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(accum["optim.0.exp_avg"], full["optim.0.exp_avg"], rtol=1e-4, atol=1e-7)
    losses = [[r["loss"] for r in log_rows(tmp_path / name)] for name in ("full", "accum")]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=0)


def test_bf16_autocast_trains_smoke(tmp_path):
    run = train(tiny_config(steps=40, bf16=True, lr=3e-3, warmup=5, log_every=5), tmp_path / "bf16", progress=False)
    losses = [r["loss"] for r in log_rows(run)]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
    weights = run_tensors(run)
    assert all(v.dtype == torch.float32 for k, v in weights.items() if v.is_floating_point())
    # autocast really ran in bf16: the same 10 steps in fp32 log other (but close) losses
    fp32 = train(tiny_config(steps=10, lr=3e-3, warmup=5, log_every=5), tmp_path / "fp32", progress=False)
    fp32_losses = [r["loss"] for r in log_rows(fp32)]
    assert fp32_losses != losses[:2]
    torch.testing.assert_close(torch.tensor(losses[:2]), torch.tensor(fp32_losses), rtol=0.05, atol=0)
