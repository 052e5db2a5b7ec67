"""`difflab demo` end to end on digits with a tiny budget: report, summary and grids are written,
and the quality numbers in them are real measurements (held-out real images beat an untrained model)."""

import json

import pytest

from difflab.demo import run_demo


def test_demo_writes_report_with_quality_table(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    report = run_demo(out=tmp_path / "demo", steps=2, data="digits", n_per_class=2, n_eval=40,
                      samplers=[("euler", 2), ("dpmpp_2m", 3)])
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert [(r["sampler"], r["steps"]) for r in summary["samplers"]] == [("euler", 2), ("dpmpp_2m", 3)]
    real = summary["real"]
    for row in summary["samplers"]:
        # a 2-step model makes noise: real images must score far better on every measure
        assert row["fd"] > 2 * real["fd"]
        assert row["class_accuracy"] < real["class_accuracy"]
        assert row["nn_distance"] > real["nn_distance"]
        assert (tmp_path / "demo" / f"samples_{row['sampler']}_{row['steps']}.png").stat().st_size > 0
    assert real["class_accuracy"] > 0.9
    page = report.read_text()
    assert "FD-" in page and "held-out real images" in page and "data:image/png;base64," in page


def test_demo_rejects_too_few_eval_samples(tmp_path):
    with pytest.raises(ValueError, match="n_eval"):
        run_demo(out=tmp_path / "demo", steps=1, data="digits", n_per_class=8, n_eval=10)
