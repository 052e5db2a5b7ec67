import pytest
import torch

from difflab.metrics import inception_score, knn_radii, precision_recall


def _gauss(n, d=16, seed=0, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * scale + shift


def test_knn_radii_match_brute_force():
    f = _gauss(300, 5)
    d = torch.cdist(f, f)
    d.fill_diagonal_(float("inf"))
    expected = d.sort(dim=1).values[:, 2]  # 3rd nearest other point
    torch.testing.assert_close(knn_radii(f, k=3, block=64), expected, rtol=1e-5, atol=1e-5)


def test_identical_distributions_give_high_precision_and_recall():
    # k-NN balls of a finite sample cover less of the support as the dimension grows (4-D, 2000
    # points: ~0.96; 16-D: ~0.78), so "identical gives ~1" is checked where the estimate is sharp
    pr = precision_recall(_gauss(2000, d=4, seed=0), _gauss(2000, d=4, seed=1), k=3)
    assert pr["precision"] > 0.93 and pr["recall"] > 0.93, pr
    assert abs(pr["precision"] - pr["recall"]) < 0.03, pr


def test_collapsed_generator_has_high_precision_low_recall():
    real = _gauss(2000, seed=0)
    # all samples near one real point: inside the real manifold, covering almost none of it
    fake = real[0] + 0.01 * _gauss(2000, seed=1)
    pr = precision_recall(real, fake, k=3)
    assert pr["precision"] > 0.95 and pr["recall"] < 0.05, pr


def test_far_away_generator_has_zero_precision():
    pr = precision_recall(_gauss(1000, seed=0), _gauss(1000, seed=1, shift=20.0), k=3)
    assert pr["precision"] == 0.0 and pr["recall"] == 0.0, pr


def test_precision_recall_refuses_mismatched_features():
    with pytest.raises(ValueError, match="dimensions"):
        precision_recall(torch.zeros(10, 3), torch.zeros(10, 4))


def test_inception_score_extremes():
    k = 10
    one_hot = torch.eye(k).repeat(50, 1)  # confident, every class equally often
    assert inception_score(one_hot) == pytest.approx(k, rel=1e-12)
    constant = torch.softmax(torch.randn(1, k), 1).expand(500, k)
    assert inception_score(constant) == pytest.approx(1.0, abs=1e-12)
    # confident but only 2 of 10 classes used: IS = 2
    assert inception_score(torch.eye(k)[torch.arange(400) % 2]) == pytest.approx(2.0, rel=1e-12)
    mean, std = inception_score(one_hot, splits=5)
    assert mean == pytest.approx(k) and std == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="sum"):
        inception_score(torch.ones(4, 3))
