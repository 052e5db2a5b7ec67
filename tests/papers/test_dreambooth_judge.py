"""papers/concepts.py's judge (red-star rate, two-colour rate, SIM, CLIP-I, DIV, colour diversity) on
images whose answers are known, and papers/dreambooth's verdict wording as `difflab reproduce` reads it."""

import pytest

from difflab.data.shapes import COLORS, SHAPES, make_shapes
from difflab.reproduce import read_claims
from papers.dreambooth import run as db
from papers.concepts import Judge, concept_images


def test_judge_scores_the_subject_and_other_colours():
    judge = Judge(concept_images(16, seed=3))
    red = judge(concept_images(24, seed=11), boot=10, seed=0)
    assert red["subject"] >= 0.9 and red["red"] >= 0.9
    others = make_shapes(24, seed=5, exclude=[{"shape": s} for s in SHAPES if s != "star"] + [{"color": "red"}])
    other = judge(others["images"], boot=10, seed=0)
    assert other["subject"] <= 0.1 and other["star"] >= 0.9
    # held-out red stars are closer to the subject's features than stars of the other colours
    assert red["sim"] > other["sim"] + 2 * (red["sim_se"] ** 2 + other["sim_se"] ** 2) ** 0.5
    assert red["clip_sim"] > other["clip_sim"] + 2 * (red["clip_sim_se"] ** 2 + other["clip_sim_se"] ** 2) ** 0.5
    # one colour only against five: the colour diversity sees it, its bootstrap SE is positive
    assert red["color_div"] < other["color_div"] and other["color_div_se"] > 0
    assert sum(other["colors"]) == 24 and other["colors"][COLORS.index("red")] <= 2
    assert red["split"] == 0 and other["split"] == 0


def test_judge_scores_the_two_colour_concept():
    judge = Judge(concept_images(16, seed=3, concept="two_colour"))
    two = judge(concept_images(64, seed=11, concept="two_colour"), boot=0)
    red = judge(concept_images(64, seed=11), boot=0)
    assert two["split"] == 1 and two["two_colours"] == 1 and red["split"] == 0
    assert two["clip_sim"] > red["clip_sim"] + 2 * (two["clip_sim_se"] ** 2 + red["clip_sim_se"] ** 2) ** 0.5


def _rows(drift: float) -> dict:
    def r(subject, color_div):
        return {
            "n": 200,
            "subject": subject,
            "star": 1.0,
            "red": subject,
            "sim": 0.8,
            "sim_se": 0.01,
            "clip_sim": 0.5,
            "clip_sim_se": 0.01,
            "div": 0.1,
            "div_se": 0.01,
            "color_div": color_div,
            "color_div_se": 0.02,
            "colors": [0] * 6,
        }

    rows = {"base": {db.SUBJECT_PROMPT: r(0.0, 0.7), db.CLASS_PROMPT: r(0.01, 0.7)}}
    for name in db.VARIANTS:
        rows[name] = {db.SUBJECT_PROMPT: {**r(0.9, 0.1), "sim": 0.9, "clip_sim": 0.9}, db.CLASS_PROMPT: r(0.02, 0.7)}
    rows["full_noprior"][db.CLASS_PROMPT] = r(drift, 0.7 - drift)
    return rows


@pytest.mark.parametrize("drift,verdict", [(0.6, "partly"), (0.02, "does not hold")])
def test_prior_claim_verdict_is_read_by_reproduce(drift, verdict):
    # full drifts (or not); LoRA never does: reproduce must read "partly" / "does not hold", not "holds"
    text = "## Claims, measured\n\n" + db._fidelity_claim(_rows(drift)) + "\n" + db._prior_claim(_rows(drift))
    fidelity, prior = read_claims(text)
    assert fidelity.verdict == "holds"
    assert prior.verdict == verdict
