"""`evaluate_run` on a text-conditional latent run: samples are drawn for held-out captions
(not the empty prompt), and bits/dim is refused for latents (not a pixel likelihood)."""

from difflab.metrics.evaluate import evaluate_run
from difflab.pipeline import Pipeline
from difflab.train import train
from tests.train.helpers import SHAPES16, make_autoencoder, text_config


def test_text_latent_run_is_scored_on_test_captions_without_bits_per_dim(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    ae = make_autoencoder(tmp_path / "ae")
    run = train(text_config(autoencoder=str(ae), steps=3), tmp_path / "run", progress=False)
    seen = {}
    original = Pipeline.__call__

    def spy(self, n, **kw):
        seen["prompt"] = kw.get("prompt")
        return original(self, n, **kw)

    monkeypatch.setattr(Pipeline, "__call__", spy)
    logs = []
    r = evaluate_run(run, sampler="euler", steps=2, n=12, bpd="vlb", bpd_n=4, progress=False, log=logs.append)
    from difflab.data import load_dataset

    captions = load_dataset("shapes", "test", **SHAPES16).captions
    assert seen["prompt"] == [captions[i % len(captions)] for i in range(12)]
    assert r["prompts"] and r["bits_per_dim"] is None and r["bpd"] is None
    assert any("latent" in line and "bits/dim" in line for line in logs)
    assert r["fd"] > 0 and 0 <= r["precision"] <= 1
