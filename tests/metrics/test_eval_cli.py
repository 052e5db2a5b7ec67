"""`difflab eval` on a tiny run (a few training steps of unet-xs on digits)."""

import json

import pytest
import torch

from difflab.cli import main
from difflab.data import load_dataset


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from difflab.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = TrainConfig(data="digits", model="unet-xs", steps=3, batch_size=16, save_every=0, log_every=1, warmup=1)
    before = torch.get_num_threads()  # module-scoped: set up before the one_thread fixture applies
    torch.set_num_threads(1)
    try:
        return train(cfg, out, progress=False)
    finally:
        torch.set_num_threads(before)


def test_eval_prints_and_writes_json(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "eval.json"
    args = [
        "eval",
        "--run",
        str(tiny_run),
        "--sampler",
        "euler",
        "--steps",
        "2",
        "--n",
        "64",
        "--bpd",
        "vlb",
        "--bpd-n",
        "8",
        "--bpd-timesteps",
        "10",
        "--no-progress",
    ]
    assert main(args + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reference statistics: computing digits/train" in printed
    for row in ("FD-digits", "precision", "recall", "IS (analogue)", "class accuracy", "bits/dim"):
        assert row in printed, row
    r = json.loads(out.read_text())
    assert r["n"] == 64 and r["sampler"] == "euler" and r["steps"] == 2 and r["dataset"] == "digits"
    assert r["extractor"]["name"] == "digits" and len(r["extractor"]["sha256"]) == 64
    assert r["reference"]["n"] == len(load_dataset("digits", "train")) and r["reference"]["from_cache"] is False
    assert r["fd"] > 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["pr_n"] == 64
    assert 1 <= r["inception_score"] <= 10 and 0 <= r["class_accuracy"] <= 1
    b = r["bpd"]
    assert b["method"] == "vlb" and b["n"] == 8 and b["split"] == "test" and b["timesteps"] == 10
    assert b["conditioning"] == "null label" and b["grid"] == "vp_linear(1000)"
    assert r["bits_per_dim"] == b["value"] and 0 < b["value"] < 100
    # the second evaluation reads the cached reference statistics, and says so
    assert main(args + ["--bpd", "none"]) == 0  # the last --bpd wins; JSON to RUN/eval.json
    printed = capsys.readouterr().out
    assert "reference statistics: loaded" in printed and "bits/dim" not in printed
    r2 = json.loads((tiny_run / "eval.json").read_text())
    assert r2["reference"]["from_cache"] is True and r2["fd"] == pytest.approx(r["fd"], rel=1e-9)
    assert r2["bits_per_dim"] is None


def test_eval_with_inception_but_no_weights_says_what_to_do(tiny_run, capsys):
    assert main(["eval", "--run", str(tiny_run), "--extractor", "inception", "--n", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "difflab eval: error" in err and "--inception-weights" in err and "pt_inception" in err


def test_eval_names_a_device_that_is_not_here(tiny_run, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: every device name is valid here")
    assert main(["eval", "--run", str(tiny_run), "--n", "8", "--device", "cuda", "--no-progress"]) == 2
    assert "device 'cuda' requested, but this torch has no CUDA device" in capsys.readouterr().err
