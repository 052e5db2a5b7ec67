"""`difflab demo`, the tour, with tiny budgets: every section runs, writes its figures, and its numbers
stand where they must against the real-image reference it prints beside them."""

import json

import pytest

from difflab import demo as demo_mod
from difflab.demo import TourBudget, run_demo


def _rows(section):
    return {r["name"]: r for r in section["rows"]}


@pytest.mark.needs_fashion_mnist
def test_tour_on_fashion_mnist_numbers_against_their_references(tmp_path, capsys):
    report = run_demo(out=tmp_path / "demo", budget=TourBudget.tiny(), prompts=["a small blue star on the right"])
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "difflab demo: data Fashion-MNIST"
    s = json.loads((tmp_path / "demo" / "summary.json").read_text())
    real, sec = s["real"], s["sections"]
    assert real["class_accuracy"] > 0.8

    # 1. the zoo model at 6 steps: close to real images; the default sampler beats DDIM at equal steps
    default, ddim = sec["samplers"]["rows"]
    assert default["class_accuracy"] > real["class_accuracy"] - 0.2
    assert default["fd"] < 2.5 * real["fd"] and default["fd"] < ddim["fd"]

    # 2. guidance raises class accuracy (s = 3 against s = 1, the same noise)
    g = sec["guidance"]["rows"]
    assert [r["guidance_scale"] for r in g] == [1.0, 3.0]
    assert g[1]["class_accuracy"] >= g[0]["class_accuracy"] and "real" in sec["guidance"]

    # 3. text-to-image: the prompts' attributes, against real images with their own captions
    t = sec["text"]
    assert t["real"]["attribute_accuracy"] > 0.95
    assert max(r["attribute_accuracy"] for r in t["rows"]) > 0.6

    # 4. editing: RePaint keeps the known pixels exactly and fills with the right class more often
    # than chance; the shapes edits change the colour and keep the rest as the rendered target does
    e = _rows(sec["editing_images"])
    assert e["RePaint"]["known_change"] == 0.0 and e["RePaint"]["class_accuracy"] > 0.3
    assert sec["editing_images"]["real"]["class_accuracy"] > 0.8
    # SDEdit keeps to its stroke guide: nearer to it than the original image it was drawn from
    sd = e["SDEdit t0 = 0.5"]
    assert sd["guide_l2"] < 0.75 * sec["editing_images"]["real"]["guide_l2"]
    et = _rows(sec["editing_text"])
    assert sec["editing_text"]["real"]["edit_success"] == 1.0
    assert et["DiffEdit"]["edit_success"] >= 2 / 3 and et["DiffEdit"]["mask_iou"] > 0.2
    assert et["Prompt-to-Prompt (swap)"]["kept"] >= 2 / 3

    # 5. three training steps give noise: far from real images and from the zoo model
    own, zoo_row = sec["training"]["rows"]
    assert own["train_steps"] == 3
    assert own["fd"] > 5 * zoo_row["fd"] and own["fd"] > 5 * real["fd"]
    assert own["class_accuracy"] < real["class_accuracy"] - 0.3

    page = report.read_text()
    for heading in (
        "1. Samplers",
        "2. Classifier-free guidance",
        "3. Text-to-image",
        "4. Editing",
        "5. Training from scratch",
        "held-out real images",
        "a small blue star on the right",
    ):
        assert heading in page or heading in json.dumps(s), heading
    assert page.count("data:image/png;base64,") == sum(len(v.get("figures", [])) for v in sec.values())


def test_tour_without_fashion_mnist_says_so_first_and_uses_digits(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("difflab.data.fashion_mnist.fashion_mnist_available", lambda root=None: False)
    run_demo(out=tmp_path / "demo", budget=TourBudget.tiny(), sections=("samplers", "guidance", "training"))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("difflab demo: data sklearn digits -- Fashion-MNIST is not installed (run `apt-get")
    s = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert s["data"] == "digits" and s["zoo_model"] == "digits-unet-s"
    assert "unconditional" in s["sections"]["guidance"]["skipped"]
    zoo_fd, real_fd = s["sections"]["samplers"]["rows"][0]["fd"], s["real"]["fd"]
    own = s["sections"]["training"]["rows"][0]
    # at 6 steps the zoo model is far nearer real images than a 3-step training is to either
    assert real_fd < zoo_fd < own["fd"] / 5


def test_demo_rejects_bad_budgets_and_unknown_sections(tmp_path):
    with pytest.raises(ValueError, match="positive"):
        run_demo(out=tmp_path / "d", budget=TourBudget(train_steps=0))
    with pytest.raises(ValueError, match="unknown demo section 'nope'"):
        run_demo(out=tmp_path / "d", sections=("nope",))
    with pytest.raises(ValueError, match="fashion_mnist or digits"):
        run_demo(out=tmp_path / "d", data="cifar")


def test_demo_refuses_a_prompt_the_tokenizer_cannot_take_before_any_work(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setattr(demo_mod, "_Scorer", lambda *a, **k: pytest.fail("work started before the prompt check"))
    with pytest.raises(ValueError, match="token"):
        run_demo(out=tmp_path / "d", prompts=["word " * 400], budget=TourBudget.tiny())
