"""The model zoo: every committed checkpoint still produces the quality recorded beside it, and
publishing writes a complete entry (or nothing)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from difflab import zoo


def _entries():
    """Every zoo name; those trained on Fashion-MNIST need its files for the FD reference."""
    out = []
    for name in zoo.names():
        data = json.loads((zoo.ZOO_DIR / name / "config.json").read_text())["data"]["name"]
        marks = [pytest.mark.needs_fashion_mnist] if data == "fashion_mnist" else []
        out.append(pytest.param(name, marks=marks))
    return out


@pytest.mark.parametrize("name", _entries())
def test_committed_zoo_model_meets_its_recorded_quality(name):
    want, got = zoo.check(name)  # raises with the numbers when a metric drifts beyond tolerance
    assert got["n"] == want["n"] and got["fd"] > 0


def test_publish_records_metrics_and_check_catches_a_damaged_model(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path / "zoo")
    monkeypatch.setattr(zoo, "CHECK", {"n": 60, "steps": 3, "seed": 0})
    out = zoo.publish(tiny_run, "tiny", "difflab train --steps 3 ...", n=60, steps=3, progress=False)
    record = json.loads((out / "zoo.json").read_text())
    assert record["train"]["steps"] == 3 and record["eval"]["n"] == 60
    assert set(record["check"]) >= {"fd", "precision", "recall", "class_accuracy"}
    assert zoo.names() == ["tiny"] and "`tiny`" in zoo.table()
    assert "## Metrics" in (out / "README.md").read_text()  # the model card comes with it
    want, got = zoo.check("tiny")
    assert got["fd"] == pytest.approx(want["fd"], rel=1e-4)  # same machine, same seed: same samples

    # damage the weights: the recorded quality no longer holds and check() says which numbers moved
    weights = load_file(out / "model.safetensors")
    save_file(
        {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in weights.items()}, out / "model.safetensors"
    )
    with pytest.raises(AssertionError, match="FD .* vs recorded"):
        zoo.check("tiny")


def test_unknown_zoo_model_names_the_known_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "zoo.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no zoo model 'b' \\(known: a\\)"):
        zoo.load("b")


def test_prompt_attribute_accuracy_reads_what_the_prompt_names():
    from difflab.data import load_dataset

    test = load_dataset("shapes", "test", n=200)
    prompts = list(test.captions)
    right = zoo.prompt_attribute_accuracy(test.images, prompts)
    wrong = zoo.prompt_attribute_accuracy(test.images, prompts[1:] + prompts[:1])  # each image, another's prompt
    assert right > 0.9, right
    assert wrong < 0.2, wrong


def test_sample_and_edit_take_a_zoo_name(tmp_path, capsys, monkeypatch):
    """`--run NAME` finds the zoo model when no folder of that name exists (sample, edit)."""
    from difflab.cli import main
    from difflab.data import save_image_grid
    from difflab.data.shapes import render

    monkeypatch.chdir(tmp_path)  # no folder called shapes-text-unet here
    assert main(["sample", "--run", "shapes-text-unet", "--prompt", "a red star", "--n", "2", "--steps", "2",
                 "--out", "s.png"]) == 0  # fmt: skip
    save_image_grid(render({"shape": "circle", "color": "red", "size": "large", "position": "left"})[None],
                    "in.png", nrow=1, padding=0)  # fmt: skip
    code = main(["edit", "imagic", "--run", "shapes-text-unet", "--image", "in.png", "--prompt",
                 "a large blue star on the left", "--embed-steps", "1", "--tune-steps", "1", "--steps", "2",
                 "--sweep", "0", "--out", "e.png", "--no-progress"])  # fmt: skip
    assert code == 0 and (tmp_path / "s.png").is_file() and (tmp_path / "e.png").is_file()
    assert "input | eta 0 (reconstruction) | output (eta 0.7)" in capsys.readouterr().out
