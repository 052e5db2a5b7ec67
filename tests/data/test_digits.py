import torch

from difflab.data.digits import digits_split, load_digits


def test_digits_shape_range_and_split():
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    assert x.shape[1:] == (1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(x) + len(xt) == 1797 and abs(len(xt) - 0.2 * 1797) < 10
    assert x.min() == -1 and x.max() == 1 and xt.min() >= -1 and xt.max() <= 1
    assert set(y.tolist()) == set(range(10)) == set(yt.tolist())
    # stratified: each class has ~20% of its images in test
    counts = torch.bincount(yt, minlength=10).double() / (
        torch.bincount(y, minlength=10) + torch.bincount(yt, minlength=10)
    )
    assert (counts - 0.2).abs().max() < 0.01


def test_digits_split_deterministic_and_disjoint():
    xa, ya = load_digits("all")
    tr, te = digits_split(ya, seed=0)
    tr2, te2 = digits_split(ya, seed=0)
    tr3, _ = digits_split(ya, seed=1)
    assert torch.equal(tr, tr2) and torch.equal(te, te2) and not torch.equal(tr, tr3)
    assert torch.equal(torch.cat([tr, te]).sort().values, torch.arange(1797))
    x, y = load_digits("test")
    assert torch.equal(x, xa[te]) and torch.equal(y, ya[te])


def test_digits_native_grid_and_bilinear_upsampling():
    x8, _ = load_digits("all", size=8)
    v = (x8 + 1) * 8  # back to sklearn's 0..16 integers
    assert torch.equal(v, v.round()) and v.min() == 0 and v.max() == 16
    x16, _ = load_digits("all", size=16)
    # bilinear with half-pixel centres: convex combinations, so range and mean are kept
    assert x16.min() >= -1 and x16.max() <= 1
    assert abs(float(x16.mean() - x8.mean())) < 0.02
    ref = torch.nn.functional.interpolate(x8, size=16, mode="bilinear", align_corners=False)
    torch.testing.assert_close(x16, ref)
