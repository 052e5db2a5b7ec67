"""Registry: every name builds, configs round-trip through JSON, FLOPs are counted in one place."""

import json

import pytest
import torch

from difflab.nn import (
    MODEL_NAMES,
    DiT,
    UNet,
    count_flops,
    create_model,
    create_model_from_config,
    model_config,
)

CPU_SIZED = ["unet-xs", "unet-s", "unet-m"] + [f"DiT-{s}/{p}" for s in ("T", "XS", "M") for p in (2, 4, 8)]


@pytest.mark.parametrize("name", CPU_SIZED)
def test_smoke_registry_cpu_models_build_and_run(name):
    net = create_model(name)
    assert isinstance(net, UNet if name.startswith("unet") else DiT)
    values = net.config_dict()
    assert json.loads(json.dumps(values)) == values
    assert create_model_from_config(values).config == net.config
    x = torch.randn(1, net.config.in_channels, 32, 32)
    assert net(x, torch.tensor([5.0])).shape == x.shape


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n not in CPU_SIZED])
def test_smoke_registry_large_models_build_on_meta(name):
    with torch.device("meta"):
        net = create_model(name)
    values = json.loads(json.dumps(net.config_dict()))
    with torch.device("meta"):
        assert create_model_from_config(values).config == net.config
    assert sum(p.numel() for p in net.parameters()) > 1e6
    if name == "unet-ddpm-cifar10":
        assert abs(sum(p.numel() for p in net.parameters()) / 35.7e6 - 1) < 0.005  # DDPM: 35.7M
        assert 5e9 < net.flops_per_image() < 20e9  # ~6 G multiply-adds


def test_registry_overrides_and_errors():
    net = create_model("unet-s", image_size=28, in_channels=1, num_classes=10)
    assert (net.config.image_size, net.config.in_channels, net.config.out_channels) == (28, 1, 1)
    assert net.config.attention_resolutions == (7,)  # the preset's factor 4, at 28 px
    out = net(torch.randn(2, 1, 28, 28), torch.zeros(2), class_labels=torch.tensor([0, 9]))
    assert out.shape == (2, 1, 28, 28)
    assert create_model("unet-s").config.attention_resolutions == (8,)
    with pytest.raises(ValueError, match="image_size 28 is not divisible by 8"):
        create_model("unet-ddpm-cifar10", image_size=28)
    with pytest.raises(ValueError, match="unknown model name 'unet-q'"):
        create_model("unet-q")
    with pytest.raises(ValueError, match="'widht'"):
        create_model("unet-xs", widht=3)
    with pytest.raises(ValueError, match="'gan'"):
        create_model_from_config({"arch": "gan"})
    with pytest.raises(ValueError, match="'dit', not 'unet'"):
        UNet.from_config_dict(create_model("DiT-T/4").config_dict())
    assert create_model("DiT-T/4", image_size=16).config.input_size == 16  # the UNet's name works
    with pytest.raises(ValueError, match="image_size=16 and input_size=32"):
        create_model("DiT-T/4", image_size=16, input_size=32)
    assert model_config("DiT-XL/2").num_classes == 1000  # paper sizes keep the paper's defaults


def test_count_flops_counts_attention_matmuls():
    net = create_model("DiT-T/4", input_size=16, depth=1)
    x, t = torch.randn(1, 3, 16, 16), torch.zeros(1)
    d, n, mlp = 64, 16, 256
    linear = 2 * n * (4 * d * d + 2 * d * mlp)  # q, k, v, out and the MLP
    attention = 2 * 2 * n * n * d  # q k^T and p v
    patches = 2 * n * d * 3 * 16 + 2 * n * d * 16 * 3  # patch embed and final linear
    adaln = 2 * d * 6 * d + 2 * d * 2 * d
    time_mlp = 2 * (256 * d + d * d)
    assert count_flops(net, x, t) == linear + attention + patches + adaln + time_mlp
    assert net.flops_per_image() == count_flops(net, x, t)
