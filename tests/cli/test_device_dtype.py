"""Pipeline.to(device, dtype) and --device / --dtype: bf16 and fp16 sample what fp32 samples, within
the dtype's precision, on the CPU here (a GPU check lives in bench/gpu_checks.py); bad devices and
dtypes are one-line errors."""

import pytest
import torch

from difflab import zoo
from difflab.cli import main
from difflab.edit import edit
from difflab.pipeline import resolve_device, resolve_dtype


@pytest.mark.parametrize("dtype, tol", [("bf16", 0.02), ("fp16", 0.005)])
def test_low_precision_samples_what_fp32_samples(dtype, tol):
    ref = zoo.load("digits-unet-s")(4, steps=4, seed=0)
    pipe = zoo.load("digits-unet-s").to("cpu", dtype)
    assert pipe.dtype == resolve_dtype(dtype) and next(pipe.denoiser.net.parameters()).dtype == pipe.dtype
    x = pipe(4, steps=4, seed=0)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    diff = (x - ref).abs().mean().item()
    assert 0 < diff < tol  # the dtype is really used, and it changes the samples only by its precision


def test_low_precision_edit_keeps_the_known_pixels():
    pipe = zoo.load("digits-unet-s").to("cpu", "bf16")
    image = torch.linspace(-1, 1, 256).reshape(1, 1, 16, 16)
    keep = torch.zeros(1, 1, 16, 16)
    keep[..., 8:, :] = 1
    out = edit(pipe, "repaint", image, mask=keep, steps=4, seed=0, jump_length=2, jump_n_sample=2).output
    assert out.dtype == torch.float32 and torch.equal(out[..., 8:, :], image[..., 8:, :])


def test_bad_devices_and_dtypes_are_named(tmp_path, capsys):
    with pytest.raises(ValueError, match="dtype must be one of fp32, bf16, fp16, got 'fp8'"):
        resolve_dtype("fp8")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "sample",
                "--run",
                str(zoo.ZOO_DIR / "digits-unet-s"),
                "--n",
                "2",
                "--steps",
                "2",
                "--dtype",
                "bf16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert out.exists()
    if not torch.cuda.is_available():
        assert main(["sample", "--run", str(zoo.ZOO_DIR / "digits-unet-s"), "--device", "cuda", "--out", str(out)]) == 2
        assert "device 'cuda' requested, but this torch has no CUDA device" in capsys.readouterr().err


def test_eval_samples_in_the_dtype_and_bounds_bits_per_dim_with_fp32_weights(tmp_path, monkeypatch):
    from difflab.metrics.evaluate import evaluate_run, format_report

    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    run = zoo.ZOO_DIR / "digits-unet-s"
    kw = dict(sampler="euler", steps=3, n=8, bpd="vlb", bpd_n=4, bpd_timesteps=4, progress=False, log=lambda s: None)
    fp32 = evaluate_run(run, **kw)
    bf16 = evaluate_run(run, dtype="bf16", **kw)
    assert fp32["dtype"] == "fp32" and bf16["dtype"] == "bf16" and "sampled in bf16" in format_report(bf16)
    assert bf16["fd"] != fp32["fd"]  # the samples really came from bf16 networks
    assert bf16["bits_per_dim"] == fp32["bits_per_dim"]  # the bound used the exact fp32 weights
    with pytest.raises(ValueError, match="dtype must be one of"):
        evaluate_run(run, dtype="fp8", **kw)
