"""FID and KID by the published conventions (difflab.metrics.standard) against torchmetrics: the same
random Inception weights file goes into torchmetrics' torch-fidelity Inception and into difflab's, the
same uint8 images into both; FID and KID agree within 1% (measured: 4e-8 relative), with the TF1
resize (torch-fidelity's) and with torchmetrics' antialiased one."""

import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch

from difflab.cli import main
from difflab.metrics.inception import InceptionV3, load_inception
from difflab.metrics.standard import (
    fid_kid,
    inception_features_uint8,
    kid,
    load_image_folder,
    resize_tf1_bilinear,
    to_uint8,
)


def _torchmetrics():
    """torchmetrics' FID and KID. torch-fidelity's package __init__ imports torchvision (which cannot
    load against this CPU torch), so its package is entered without running __init__: torchmetrics
    needs only its Inception module and TF1 resize, which import torch alone."""
    if "torch_fidelity" not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None:
            pytest.skip("torch-fidelity is not installed (requirements-test.lock)")
        pkg = types.ModuleType("torch_fidelity")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = pkg
    pytest.importorskip("torchmetrics")
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    return FrechetInceptionDistance, KernelInceptionDistance


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random FID-layout Inception file whose features depend on the image: Kaiming convolutions and
    batch-norm statistics calibrated on noise (default statistics make every image look alike)."""
    torch.manual_seed(0)
    net = InceptionV3("fid")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
        net.train()
        net(torch.rand(4, 3, 299, 299, generator=torch.Generator().manual_seed(9)) * 2 - 1)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"] = torch.randn(1008, 2048) * 0.01  # the file layout torch-fidelity loads strictly
    state["fc.bias"] = torch.zeros(1008)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(state, path)
    return path


def _images(n):
    g = torch.Generator().manual_seed(1)
    a = (torch.rand(n, 3, 24, 24, generator=g) * 255).to(torch.uint8)
    b = (torch.rand(n, 3, 24, 24, generator=g) ** 2 * 255).to(torch.uint8)  # darker: a real distance
    return a, b


def test_fid_and_kid_equal_torchmetrics_with_the_tf1_resize(weights):
    FID, KID = _torchmetrics()
    n = 6  # Inception at 299 x 299 costs ~0.7 s an image on one core
    a, b = _images(n)
    ref = FID(feature=2048, normalize=False, antialias=False, feature_extractor_weights_path=str(weights))
    ref.update(a, real=True)
    ref.update(b, real=False)
    ref_kid = KID(feature=ref.inception, subsets=1, subset_size=n, normalize=False)  # all n: no random subset
    ref_kid.update(a, real=True)
    ref_kid.update(b, real=False)
    want_fid, want_kid = ref.compute().item(), ref_kid.compute()[0].item()
    net = load_inception(weights)
    fa, fb = inception_features_uint8(net, a), inception_features_uint8(net, b)
    got = fid_kid(fa, fb, kid_subsets=1, kid_subset_size=n)
    assert want_fid > 1.0 and want_kid > 0  # the two sets really differ under these weights
    assert got["fid"] == pytest.approx(want_fid, rel=0.01)
    assert got["kid"] == pytest.approx(want_kid, rel=0.01)


def test_the_antialias_resize_equals_torchmetrics_default(weights):
    FID, _ = _torchmetrics()
    a, _ = _images(2)
    ref = FID(feature=2048, normalize=False, feature_extractor_weights_path=str(weights))  # antialias=True
    want = ref.inception(a).double()
    got = inception_features_uint8(load_inception(weights), a, resize="antialias")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3 * want.abs().max().item())


def test_uint8_quantisation_and_the_tf1_resize():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0]).reshape(1, 1, 1, 5)
    assert to_uint8(x).flatten().tolist() == [0, 0, 128, 191, 255]  # round((x + 1) * 127.5)
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.tensor([float("nan")]))
    ramp = torch.arange(4.0).reshape(1, 1, 1, 4).expand(1, 1, 4, 4)
    up = resize_tf1_bilinear(ramp, 8)  # output i reads input i * 4 / 8: 0, .5, 1, ..., 3, 3 (edge held)
    assert up[0, 0, 0].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0]


def test_kid_is_an_unbiased_mmd():
    rng = np.random.default_rng(0)
    same = kid(rng.normal(size=(300, 8)), rng.normal(size=(300, 8)), subsets=20, subset_size=100)
    shifted = kid(rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) + 1.0, subsets=20, subset_size=100)
    assert abs(same[0]) < 3 * same[1] + 1e-3 and shifted[0] > 10 * abs(same[0]) + 0.1


def test_difflab_fid_on_two_folders(weights, tmp_path, capsys):
    from PIL import Image

    a, b = _images(3)
    for name, images in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        for i, im in enumerate(images):
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / name / f"{i}.png")
    out = tmp_path / "fid.json"
    args = [str(tmp_path / "a"), str(tmp_path / "b"), "--inception-weights", str(weights), "--kid-subset-size", "3"]
    assert main(["fid", *args, "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "FID " in printed and "KID " in printed and "tf1 resize" in printed and out.is_file()
    report = json.loads(out.read_text())
    assert report["fid"] > 0 and report["n_a"] == report["n_b"] == 3 and f"FID {report['fid']:.4f}" in printed
    assert torch.equal(load_image_folder(tmp_path / "a"), a)  # the PNG round trip of uint8 images loses nothing
    (tmp_path / "c").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "c" / "0.png")
    Image.new("RGB", (9, 8)).save(tmp_path / "c" / "1.png")
    assert main(["fid", str(tmp_path / "a"), str(tmp_path / "c"), "--inception-weights", str(weights)]) == 2
    assert "is 9 x 8, the folder's first image 8 x 8" in capsys.readouterr().err
    assert main(["fid", str(tmp_path / "a"), str(tmp_path / "nope"), "--inception-weights", str(weights)]) == 2
    assert "does not exist" in capsys.readouterr().err
