"""Inception-v3 for FID, tested with randomly initialised weights saved locally (the standard
weights cannot be downloaded here)."""

import functools

import pytest
import torch

from difflab.metrics import InceptionV3, feature_extractor, load_inception
from difflab.metrics.inception import INCEPTION_HELP
from difflab.runfolder import atomic_save_safetensors


@functools.lru_cache(maxsize=1)
def _random_state() -> dict:
    """A randomly initialised Inception-v3 state dict (the same tensors for both variants)."""
    torch.manual_seed(0)
    net = InceptionV3("fid")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):  # keep activations O(1) through 90+ layers
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.05)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return dict(net.state_dict())


def _random_inception(with_head: int | None = None) -> dict:
    state = dict(_random_state())
    if with_head:  # what the standard files also hold (ignored for pool3 features)
        state["fc.weight"] = torch.zeros(with_head, 2048)
        state["fc.bias"] = torch.zeros(with_head)
    return state


def test_layer_names_are_torchvisions():
    keys = set(InceptionV3("fid").state_dict())
    for k in (
        "Conv2d_1a_3x3.conv.weight",
        "Conv2d_4a_3x3.bn.running_var",
        "Mixed_5b.branch5x5_2.conv.weight",
        "Mixed_6e.branch7x7dbl_5.bn.bias",
        "Mixed_7a.branch7x7x3_4.conv.weight",
        "Mixed_7c.branch3x3dbl_3b.bn.weight",
        "Mixed_7b.branch_pool.conv.weight",
    ):
        assert k in keys, k
    assert set(InceptionV3("torchvision").state_dict()) == keys  # variants differ only in pooling
    n_params = sum(
        v.numel()
        for k, v in InceptionV3("fid").state_dict().items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    # torchvision's documented 27,161,264 less its fc (2,049,000) and AuxLogits (3,326,696)
    assert n_params == 21_785_568


def test_random_weights_load_and_give_pool3_features(tmp_path):
    state = _random_inception(with_head=1008)
    path = tmp_path / "inception_random.safetensors"
    atomic_save_safetensors(state, path)
    ext = feature_extractor("inception", weights=path)
    assert ext.net.variant == "fid" and ext.dim == 2048 and len(ext.weights_sha256) == 64
    loaded = ext.net.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.items() if not k.endswith("num_batches_tracked"))
    # a grey 16 x 16 image is repeated to RGB and resized to 299: same as feeding that by hand
    g = torch.Generator().manual_seed(0)
    grey = torch.rand(1, 1, 16, 16, generator=g) * 2 - 1
    rgb = torch.nn.functional.interpolate(
        grey.expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear", align_corners=False
    )
    f = ext(torch.cat([grey.expand(-1, 3, -1, -1), torch.rand(1, 3, 16, 16, generator=g) * 2 - 1]))
    assert f.shape == (2, 2048) and torch.isfinite(f).all() and (f >= 0).all()  # post-ReLU mean
    assert f[0].abs().sum() > 0 and not torch.allclose(f[0], f[1])
    with torch.no_grad():
        torch.testing.assert_close(ext.net.preprocess(grey), rgb)


def test_pth_state_dicts_load_and_the_variant_follows_the_head(tmp_path):
    path = tmp_path / "inception_v3_google-test.pth"
    torch.save(_random_inception(with_head=1000), path)
    assert load_inception(path).variant == "torchvision"
    path2 = tmp_path / "pt_inception-test.pth"
    torch.save({"module." + k: v for k, v in _random_inception(with_head=1008).items()}, path2)
    assert load_inception(path2).variant == "fid"


def test_missing_or_ill_fitting_weights_are_explained(tmp_path):
    with pytest.raises(ValueError, match="needs a weights file"):
        feature_extractor("inception")
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        feature_extractor("inception", weights=tmp_path / "nope.pth")
    bad = _random_inception()
    del bad["Mixed_7c.branch1x1.conv.weight"]
    bad["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(3, 3, 1, 1)
    path = tmp_path / "bad.safetensors"
    atomic_save_safetensors(bad, path)
    with pytest.raises(ValueError, match=r"missing \(Mixed_7c.branch1x1.conv.weight\).*wrong shape"):
        load_inception(path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch state dict"):
        load_inception(junk)
    assert "--inception-weights" in INCEPTION_HELP


def test_matches_torchvision_when_installed():
    tv = pytest.importorskip("torchvision.models")
    ref = tv.inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False).eval()
    ours = InceptionV3("torchvision").eval()
    ref.load_state_dict({**ref.state_dict(), **_random_inception()})
    ours.load_state_dict(_random_inception())
    feats = {}
    ref.avgpool.register_forward_hook(lambda m, i, o: feats.setdefault("pool3", o.flatten(1)))
    x = torch.rand(1, 3, 299, 299) * 2 - 1
    with torch.no_grad():
        ref(x)
        torch.testing.assert_close(ours(x), feats["pool3"])
