"""Extractors and the reference-statistics cache."""

import numpy as np
import pytest
import torch

from difflab.data import load_dataset
from difflab.metrics import (
    default_extractor,
    extract,
    feature_extractor,
    frechet_distance,
    mean_cov,
    reference_stats,
    stats_cache_dir,
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "fd_stats"


def test_reference_stats_are_computed_once_cached_and_announced(cache):
    ext = feature_extractor("digits")
    logs, calls = [], []

    def images():
        calls.append(1)
        return load_dataset("digits", "train").images

    r1 = reference_stats(ext, "digits", "train", images=images, log=logs.append, keep=500)
    assert stats_cache_dir() == cache and r1.path.parent == cache
    assert r1.path.name == f"digits-train-1x16x16-digits-{ext.weights_sha256[:12]}.safetensors"
    assert not r1.loaded and "computing" in logs[-1] and calls == [1] and r1.n == len(load_dataset("digits", "train"))
    r2 = reference_stats(ext, "digits", "train", images=images, log=logs.append, keep=500)
    assert r2.loaded and "loaded" in logs[-1] and calls == [1]  # never recomputed silently
    np.testing.assert_array_equal(r1.mu, r2.mu)
    np.testing.assert_array_equal(r1.cov, r2.cov)
    torch.testing.assert_close(r1.features, r2.features)
    r3 = reference_stats(ext, "digits", "train", images=images, log=logs.append, keep=500, recompute=True)
    assert not r3.loaded and "recomputing" in logs[-1] and calls == [1, 1]
    # the statistics are those of the features; the kept subset is 500 distinct training features
    feats, probs = extract(ext, images())
    mu, cov = mean_cov(feats)
    np.testing.assert_allclose(r1.mu, mu, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(r1.cov, cov, rtol=1e-5, atol=1e-7)
    assert r1.features.shape == (500, 128) and len(torch.unique(r1.features, dim=0)) == 500
    assert probs.shape == (r1.n, 10) and torch.allclose(probs.sum(1), torch.ones(r1.n))
    # a test split is another file
    r4 = reference_stats(ext, "digits", "test", log=logs.append)
    assert r4.path != r1.path and r4.n == len(load_dataset("digits", "test"))


def test_stale_cache_contents_are_refused(cache):
    ext = feature_extractor("digits")
    r = reference_stats(ext, "digits", "test", log=lambda s: None)
    ext.weights_sha256 = "0" * 64  # pretend the weights changed but the file name did not
    r.path.rename(r.path.with_name(r.path.name.replace(r.path.name.split("-")[-1], "0" * 12 + ".safetensors")))
    with pytest.raises(ValueError, match="recompute-stats"):
        reference_stats(ext, "digits", "test", log=lambda s: None)


def test_fd_of_real_test_images_is_far_below_noise(cache):
    ext = feature_extractor("digits")
    ref = reference_stats(ext, "digits", "train", log=lambda s: None)
    test = load_dataset("digits", "test").images
    fd_test = frechet_distance(*mean_cov(extract(ext, test)[0]), ref.mu, ref.cov)
    noise = torch.rand(test.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fd_noise = frechet_distance(*mean_cov(extract(ext, noise)[0]), ref.mu, ref.cov)
    assert fd_test * 20 < fd_noise, (fd_test, fd_noise)


def test_extractor_names():
    assert default_extractor("fashion_mnist") == "fmnist" and default_extractor("shapes") == "shapes"
    with pytest.raises(ValueError, match="--extractor inception"):
        default_extractor("folder:/tmp/x")
    with pytest.raises(ValueError, match="unknown feature extractor"):
        feature_extractor("vgg")
    assert feature_extractor("fmnist").display_name == "FD-FMNIST"
