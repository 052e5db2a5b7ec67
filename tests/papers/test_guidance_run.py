"""papers/guidance/run.py's sweep machinery on a tiny random UNet (8x8, 3 classes) and a guide
trained in seconds on an easy task.

The full run measures the zoo model; here the same functions (run_cfg, run_adm, sweep) run on a
model small enough for a unit test, with a scorer that needs no reference statistics.
"""

import importlib
import json
from pathlib import Path

import pytest
import torch

from difflab.core import EDM, Preconditioned
from difflab.data import ImageData
from difflab.methods.adm import classifier_log_prob
from difflab.nn.classifier import preconditioning_of, save_classifier
from difflab.train.classifier import train_classifier
from difflab.nn.classifier import ClassifierConfig, NoisyClassifier
from difflab.nn.unet import UNet, UNetConfig
from difflab.pipeline import Pipeline

K, N, STEPS = 3, 12, 8


@pytest.fixture(scope="module")
def run():
    return importlib.import_module("papers.guidance.run")


def _pipe() -> Pipeline:
    torch.manual_seed(0)
    net = UNet(
        UNetConfig(
            image_size=8,
            in_channels=1,
            channels=8,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(),
            mid_attention=False,
            num_heads=1,
            num_classes=K,
        )
    )
    config = {
        "model": {"arch": "unet", "num_classes": K},
        "data": {"name": "tiny", "channels": 1, "size": 8, "class_names": ["a", "b", "c"]},
        "train": {"label_dropout": 0.1},  # a run whose null class was trained: classifier-free guidance works
    }
    _randomize(net, 0.2)  # zero-initialised output and modulation layers would hide the label
    return Pipeline(Preconditioned(net, EDM(), "edm").eval(), config)


def _randomize(module: torch.nn.Module, scale: float) -> None:
    """Add N(0, scale^2) to every weight, so an untrained network depends on all its inputs."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def _classifier(pipe: Pipeline, folder: Path) -> NoisyClassifier:
    """A guide trained on a task it can learn in seconds: 3 classes of dark / grey / light images."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(480) % K
    images = (y.float() - 1).reshape(-1, 1, 1, 1) * 0.6 + 0.2 * torch.randn(480, 1, 8, 8, generator=g)
    config = ClassifierConfig(
        image_size=8,
        in_channels=1,
        channels=8,
        channel_mult=(1, 2),
        attention_resolutions=(),
        num_heads=1,
        num_classes=K,
        pool_dim=16,
    )
    clf, info = train_classifier(
        ImageData(images, y, ("dark", "grey", "light"), name="tiny"),
        pipe.denoiser,
        steps=40,
        batch_size=32,
        lr=3e-3,
        config=config,
        progress=False,
    )
    save_classifier(clf, folder, info, preconditioning=preconditioning_of(pipe.denoiser))
    return clf


def _params(**kw) -> dict:
    return {
        "n": N,
        "steps": STEPS,
        "w": (0.0, 1.0, 3.0),
        "scales": (0.0, 1.0, 8.0),
        "uncond_n": N,
        "uncond_scales": (0.0, 1.0, 8.0),
        "keep": N,
        "batch_size": 8,
        **kw,
    }


def test_cfg_sweep_rows_are_the_pipeline_at_s_equal_1_plus_w(run, tmp_path, monkeypatch):
    """Each row of the CFG sweep is pipe(guidance_scale = 1 + w) from the same seed: the paper's w
    is translated to the library's s once, and every row starts from the same noise."""
    monkeypatch.setattr(run, "OUT", tmp_path)
    pipe = _pipe()
    calls = []

    def score(x, labels):
        calls.append(labels.clone())
        return {m: float(i) for i, m in enumerate(run.METRICS)}

    run.run_cfg(pipe, score, _params(), "euler", seed=3)
    res = json.loads((tmp_path / "results.json").read_text())["cfg"]
    assert list(res["rows"]) == ["0", "1", "3"] and res["rows"]["3"]["recall"] == 2.0
    assert all(torch.equal(c, torch.arange(N) % K) for c in calls)
    grids = torch.load(tmp_path / "cache" / "grid_cfg.pt")
    labels = torch.arange(N) % K
    for w in (0.0, 1.0, 3.0):
        want = pipe(N, class_labels=labels, guidance_scale=1 + w, sampler="euler", steps=STEPS, seed=3, batch_size=8)
        torch.testing.assert_close(grids[run.key(w)], want, rtol=0, atol=0)
    assert (grids["3"] - grids["0"]).abs().max() > 1e-3  # guidance changed the samples


def test_classifier_guidance_sweep_raises_the_guides_confidence(run, tmp_path, monkeypatch):
    """ADM guidance ascends log p(y | x): the guide's mean log-probability of the requested labels
    on the final samples rises with the scale, on the conditional and on the null-class model."""
    monkeypatch.setattr(run, "OUT", tmp_path)
    pipe = _pipe()
    clf = _classifier(pipe, tmp_path / "cache" / "classifier")
    log_p = classifier_log_prob(clf, pipe.denoiser)

    def score(x, labels):
        lp = log_p(x, torch.full((len(x),), 0.002, dtype=torch.float64), class_labels=labels)
        return {"fd": 0.0, "precision": 0.0, "recall": 0.0, "inception_score": 0.0, "class_accuracy": lp.mean().item()}

    for unconditional in (False, True):
        run.run_adm(pipe, score, _params(), "euler", seed=0, unconditional=unconditional)
    res = json.loads((tmp_path / "results.json").read_text())
    for part in ("adm", "adm_uncond"):
        lp = [res[part]["rows"][s]["class_accuracy"] for s in ("0", "1", "8")]
        assert lp[0] + 1.0 < lp[1] < lp[2], (part, lp)
    # the unconditional view is the network's null-class branch: at scale 0 it is CFG with s = 0
    grids = torch.load(tmp_path / "cache" / "grid_adm_uncond.pt")
    null = pipe(N, guidance_scale=0.0, sampler="euler", steps=STEPS, seed=0, batch_size=8)
    torch.testing.assert_close(grids["0"], null, rtol=1e-5, atol=1e-5)
    assert (grids["0"] - torch.load(tmp_path / "cache" / "grid_adm.pt")["0"]).abs().max() > 1e-3


def test_trend_verdicts(run):
    assert run.trend([0.1, 0.2, 0.3], +1, 0.05) == (True, "holds, monotonically")
    ok, how = run.trend([0.1, 0.09, 0.3], +1, 0.05)
    assert ok and how.startswith("holds within noise")
    ok, how = run.trend([0.1, 0.02, 0.3], +1, 0.05)
    assert ok and how.startswith("holds overall but not monotonically")
    assert run.trend([0.9, 0.8, 0.7], -1, 0.05) == (True, "holds, monotonically")
    assert run.trend([0.3, 0.31], +1, 0.05) == (False, "does not hold (no change beyond noise)")
    assert run.trend([0.3, 0.2], +1, 0.05) == (False, "does not hold (moves the other way)")
