"""Every registry entry trains two steps in the one loop and samples through the Pipeline (issue 21):
the CPU-sized networks as registered, the paper-sized DiTs with their width, heads and patch at depth
1 (their full depth costs minutes on a CPU). A paper-size DiT keeps learn_sigma on a DDPM recipe
(L_hybrid trains its variance channels) and turns it off on the default EDM recipe, which has no
variational bound to learn it by."""

import json

import pytest
import torch

from difflab.nn import MODEL_NAMES
from difflab.pipeline import Pipeline
from difflab.train import TrainConfig, train

PAPER_DIT = ("S", "B", "L", "XL")
DDPM = {
    "schedule": {"type": "DiscreteVP", "kind": "linear", "T": 1000, "quantize": False},
    "prediction": "eps",
    "sigma_sampler": "discrete_uniform",
}


def _overrides(name: str) -> dict:
    return {"depth": 1} if name.startswith("DiT-") and name[4:].split("/")[0] in PAPER_DIT else {}


def _tiny(name: str, **changes) -> TrainConfig:
    values = dict(
        data="digits",
        model=name,
        model_overrides=_overrides(name),
        conditioning="none",
        batch_size=2,
        steps=2,
        warmup=0,
        save_every=0,
        log_every=1,
        ema_decay=0.0,
    )
    values.update(changes)
    return TrainConfig(**values)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_registry_entry_trains_two_steps_and_samples(name, tmp_path):
    run = train(_tiny(name), tmp_path / "run", progress=False)
    config = json.loads((run / "config.json").read_text())
    assert config["model"].get("learn_sigma", False) is False  # EDM: no variance channels
    x = Pipeline.from_pretrained(run)(2, steps=2, seed=0)
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()


def test_paper_dit_keeps_learn_sigma_on_the_ddpm_recipe_and_samples(tmp_path):
    from difflab.core.sampling import sample_ddpm

    run = train(_tiny("DiT-S/2", **DDPM), tmp_path / "run", progress=False)
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["learn_sigma"] is True
    pipe = Pipeline.from_pretrained(run)
    assert pipe.denoiser.learned_variance
    x = pipe(2, steps=3, seed=0)
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()
    z = torch.randn(1, 1, 16, 16, dtype=torch.float64) * pipe.denoiser.schedule.sigma_max
    with torch.no_grad():
        y = sample_ddpm(
            pipe.denoiser, z.float(), pipe.denoiser.schedule, variance="learned", steps=10, noise=torch.Generator()
        )
    assert torch.isfinite(y).all()


def test_learn_sigma_on_edm_is_refused_with_the_reason(tmp_path):
    cfg = _tiny("DiT-T/2", model_overrides={"learn_sigma": True})
    with pytest.raises(ValueError, match="learn_sigma=True learns the variance by DDPM's variational bound"):
        train(cfg, tmp_path / "run", progress=False)
    cfg = _tiny("DiT-S/2", **{**DDPM, "sigma_sampler": "lognormal"})
    with pytest.raises(ValueError, match="sigma_sampler must be 'discrete_uniform'"):
        train(cfg, tmp_path / "run2", progress=False)


@pytest.mark.parametrize("recipe", ["ddpm", "iddpm"])
def test_train_recipe_flag_sets_the_papers_objective(recipe, tmp_path):
    from difflab.cli import main
    from difflab.train import recipe_config

    out = tmp_path / "run"
    rc = main(
        ["train", "--recipe", recipe, "--data", "digits", "--model", "unet-xs", "--unconditional", "--steps", "2"]
        + ["--batch-size", "2", "--save-every", "0", "--out", str(out), "--no-progress"]
    )
    assert rc == 0
    train_cfg = json.loads((out / "config.json").read_text())["train"]
    want = recipe_config(recipe)
    assert train_cfg["prediction"] == "eps" and train_cfg["sigma_sampler"] == "discrete_uniform"
    assert train_cfg["schedule"] == want.schedule
    assert train_cfg["schedule"]["kind"] == ("linear" if recipe == "ddpm" else "cosine")
    pipe = Pipeline.from_pretrained(out)
    assert pipe.denoiser.learned_variance == (recipe == "iddpm")  # iddpm: learn_sigma + L_hybrid
    assert torch.isfinite(pipe(1, steps=2, seed=0)).all()
    with pytest.raises(ValueError, match="unknown recipe 'vdm'"):
        recipe_config("vdm")
