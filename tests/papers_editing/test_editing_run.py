"""papers/editing/run.py's measurement functions on a tiny random UNet: each asserts a property
the measurement must show on any network (exact known regions and low-pass bands, call counts,
the paper's t0), plus the report pipeline end to end with a stand-in scorer."""

import importlib
import math
from types import SimpleNamespace

import pytest
import torch

from difflab.core import EDM, Preconditioned
from difflab.methods.ilvr import low_pass
from difflab.core.sampling import slice_sigmas
from difflab.nn import create_model


@pytest.fixture(scope="module")
def run():
    return importlib.import_module("papers.editing.run")


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    net = create_model(
        "unet-xs", image_size=32, in_channels=1, channels=8, channel_mult=(1, 2), head_channels=8, num_classes=10
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)  # no zero-initialised outputs: every layer matters
    return SimpleNamespace(denoiser=Preconditioned(net, EDM(), "edm").eval())


def _images(n, seed=0):
    """Smooth random 32x32 images in [-1, 1] with labels (stand-ins for Fashion-MNIST)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, size=32, mode="bilinear")
    return x, torch.randint(0, 10, (n,), generator=g)


class FakeScorer:
    """The Scorer interface without the classifier: 'FD' = |mean| + |std - 0.5|, labels by brightness."""

    def predict(self, x):
        return (x.flatten(1).mean(1) * 20).long().clamp(0, 9)

    def correct(self, x, labels):
        return (self.predict(x) == labels).tolist()

    def __call__(self, x, labels=None):
        agree = None if labels is None else float((self.predict(x) == labels).double().mean())
        return {
            "fd": float(x.mean().abs() + (x.std() - 0.5).abs()),
            "precision": 0.5,
            "recall": 0.5,
            "class_agreement": agree,
            "n": len(x),
        }


@pytest.fixture()
def patched(run, monkeypatch, tmp_path):
    monkeypatch.setattr(run, "test_images", lambda n, seed, offset=0: _images(n, seed * 100 + offset))
    monkeypatch.setattr(run, "OUT", tmp_path)
    return run


def test_vp_time_grid_starts_sdedit_at_the_papers_t0(run):
    grid = run.vp_time_grid(40)
    for t0 in (0.2, 0.5, 0.8, 1.0):
        want = math.sqrt(math.expm1(0.1 * t0 + 0.5 * 19.9 * t0 * t0))  # VP SDE, beta 0.1 -> 20
        assert float(slice_sigmas(grid, t0)[0]) == pytest.approx(want, rel=1e-12)
    assert grid[-1] == 0 and (grid[1:] < grid[:-1]).all()


def test_stroke_guides_are_flat_and_keep_straight_edges(run):
    x, _ = _images(4)
    g = run.stroke_guides(x, median=5, levels=3)
    assert set(g.unique().tolist()) <= {-1.0, 0.0, 1.0}
    half = -torch.ones(1, 1, 32, 32)
    half[..., 16:] = 1.0  # a straight edge survives a median filter
    torch.testing.assert_close(run.stroke_guides(half), half, rtol=0, atol=0)


def test_sdedit_part_counts_calls_and_moves_away_from_the_guide(patched, pipe):
    cfg = {"n": 6, "steps": 10, "strengths": [0.2, 0.6, 1.0], "quantise": 3, "median": 5}
    res = patched.run_sdedit(pipe, FakeScorer(), cfg)
    rows = res["rows"]
    assert [rows[f"{s:g}"]["calls"] for s in cfg["strengths"]] == [2, 6, 10]  # round(t0 * steps) per image
    assert rows["0.2"]["l2_to_guide"] < rows["1"]["l2_to_guide"]
    assert rows["guide"]["l2_to_guide"] == 0


def test_pairwise_diversity_is_the_mean_pairwise_distance(run):
    pts = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # sides 3, 4, 5
    x = torch.cat([pts, 2 * pts]).reshape(6, 1, 1, 2)  # two groups of three
    assert run.pairwise_diversity(x, 2) == pytest.approx((4.0 + 8.0) / 2)


def test_ilvr_part_matches_the_low_pass_exactly_and_not_by_chance(patched, pipe):
    cfg = {"refs": 2, "k": 3, "k_bicubic": 2, "steps": 5, "factors": [4, 16]}
    res = patched.run_ilvr(pipe, FakeScorer(), cfg)
    for N in ("4", "16"):
        assert res["area"][N]["lowpass_max"] < 1e-5, res["area"][N]
        assert res["area"][N]["uncond_lowpass_mae"] > 100 * max(res["area"][N]["lowpass_mae"], 1e-7)
        assert res["bicubic"][N]["lowpass_mae"] < res["bicubic"][N]["uncond_lowpass_mae"]
    refs, _ = _images(2, 200)
    x = torch.randn(2, 1, 32, 32)
    mean, mx = patched.lowpass_error(x, low_pass(x, 8) - low_pass(x, 8) + refs, 8)  # a direct check
    d = (low_pass(x, 8) - low_pass(refs, 8)).abs()
    assert mean == pytest.approx(float(d.mean()), rel=1e-6) and mx == pytest.approx(float(d.max()), rel=1e-6)


def test_masks_and_equal_call_budget(run):
    fractions = {k: float(run.make_mask(k, 1).mean()) for k in run.MASKS}
    assert fractions == {
        "fill_left": 0.5,
        "fill_top": 0.5,
        "fill_centre": 0.75,
        "lines": 0.5,
        "sr2x": 0.25,
        "expand": 0.25,
    }
    assert run.equal_calls_T(50, 5, 5) == 50 + 9 * 4 * 5  # 9 jump points below 45, 4 extra passes of 5 steps
    assert run.equal_calls_T(250, 10, 10) == 250 + 24 * 9 * 10
    assert run.equal_calls_T(7, 2, 1) == 7
    with pytest.raises(ValueError, match="unknown mask kind"):
        run.make_mask("circle", 1)


def test_repaint_parts_keep_the_known_region_and_spend_the_stated_calls(patched, pipe):
    cfg = {"n": 3, "T": 6, "jump_length": 2, "jump_n_sample": 2}
    res = patched.run_repaint(pipe, FakeScorer(), cfg)
    calls = patched.equal_calls_T(6, 2, 2)
    for kind, row in res["masks"].items():
        for name in ("resample", "replace", "replace_equal_calls"):
            assert row[name]["known_max_abs_diff"] == 0.0, (kind, name)
        assert row["resample"]["calls"] == row["replace_equal_calls"]["calls"] == calls
        assert row["replace"]["calls"] == 6
        assert row["resample"]["l2_fill_to_original"] > 0  # the unknown region was actually filled
    paper = patched.run_repaint_paper(
        pipe, FakeScorer(), {"n_per_mask": 1, "T": 6, "jump_length": 2, "jump_n_sample": 2}
    )
    assert paper["known_max_abs_diff"] == 0.0 and paper["calls"] == calls
    patched.Results(patched.OUT, patched.SORT).save("repaint", res)
    patched.Results(patched.OUT, patched.SORT).save("repaint_paper", paper)
    patched.write_report()
    text = (patched.OUT / "report.md").read_text()
    assert "known region is kept exactly" in text and "(bit-exact): reproduced" in text
    assert (patched.OUT / "figures" / "repaint.png").exists()


def test_sign_test(run):
    a, b = [0] * 5 + [1] * 3, [1] * 5 + [1] * 3  # b right where a is wrong 5 times, never the reverse
    assert run.sign_test(a, b) == (5, 0, pytest.approx(2 / 32))
    assert run.sign_test([1, 0], [1, 0]) == (0, 0, 1.0)
