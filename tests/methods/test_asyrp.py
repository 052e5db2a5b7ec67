"""Asyrp (Kwon et al. 2023): with delta_h = 0 (or scale 0) the asymmetric process is plain DDIM
exactly; the hook leaves no trace; training leaves the frozen model bit-identical while f_t learns;
the asymmetric and the symmetric process differ; bad input is a one-line error."""

import pytest
import torch

from difflab.core import EDM, Preconditioned
from difflab.core.sampling import sample
from difflab.methods.asyrp import DeltaH, asyrp_invert, asyrp_sample, asyrp_train, h_module, shifted_h
from difflab.methods.diffusionclip import ddim_grid
from difflab.nn import create_model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    net = create_model("unet-xs", image_size=8, in_channels=3, channels=16, channel_mult=(1, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    D = Preconditioned(net, EDM(), "edm").eval().requires_grad_(False)
    x = torch.tanh(torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
    return D, x


def _h_channels(D, x):
    probe = {}
    handle = h_module(D.net).register_forward_hook(lambda m, a, h: probe.setdefault("h", h))
    D(x, torch.full((1,), 1.0))
    handle.remove()
    return probe["h"].shape[1]


def _random_delta(channels):
    d = DeltaH(channels)
    with torch.no_grad():
        d.out.weight.normal_(0, 0.5)
    return d


def test_zero_shift_is_plain_ddim_and_the_hook_is_removed(tiny):
    D, x = tiny
    x_T = asyrp_invert(D, x, steps=6)
    plain = sample(D, x_T, ddim_grid(D.schedule, 1.0, 6), method="ddim")
    channels = _h_channels(D, x)
    zero = DeltaH(channels)  # zero at init
    assert torch.equal(asyrp_sample(D, x_T, zero, steps=6), plain)
    assert torch.equal(asyrp_sample(D, x_T, _random_delta(channels), steps=6, scale=0.0), plain)
    assert torch.equal(asyrp_sample(D, x_T, None, steps=6), plain)
    shifted = asyrp_sample(D, x_T, _random_delta(channels), steps=6, edit_t=0.2)
    assert not torch.equal(shifted, plain)
    assert not h_module(D.net)._forward_hooks  # nothing left behind
    # the asymmetric process differs from shifting both terms (the paper's ablation)
    both = asyrp_sample(D, x_T, _random_delta(channels), steps=6, edit_t=0.2, asymmetric=False)
    assert not torch.allclose(both, shifted)


def test_shifted_h_changes_the_output_only_inside_the_block(tiny):
    D, x = tiny
    sig = torch.full((1,), 2.0)
    before = D(x, sig)
    with shifted_h(D.net, _random_delta(_h_channels(D, x)), sig):
        inside = D(x, sig)
    assert not torch.equal(inside, before) and torch.equal(D(x, sig), before)


@pytest.fixture(scope="module")
def zoo():
    from difflab.assets import asset, resolve_run
    from difflab.data.shapes import render
    from difflab.edit import load_clip
    from difflab.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(resolve_run("shapes-text-unet"))
    image = render({"shape": "circle", "color": "red", "size": "large", "position": "left"})[None]
    return pipe, image, load_clip(asset("clip", "shapes"))


def test_training_moves_f_t_and_leaves_the_model_frozen(zoo):
    pipe, image, clip = zoo
    D = pipe.denoiser
    before = {k: v.clone() for k, v in D.state_dict().items()}
    delta, losses = asyrp_train(
        D, image, clip, "a red circle", "a green circle", steps=12, edit_t=0.5, iterations=4, lr=3e-3,
        cond=pipe.cond("a red circle"),
    )  # fmt: skip
    per_pass = len(losses) // 4
    assert per_pass >= 2 and sum(losses[-per_pass:]) < sum(losses[:per_pass])
    assert all(torch.equal(before[k], v) for k, v in D.state_dict().items())
    assert not any(p.requires_grad for p in D.parameters())
    assert any(float(p.abs().sum()) > 0 for p in delta.out.parameters())
    with pytest.raises(ValueError, match="needs a source text and a target text"):
        asyrp_train(D, image, clip, "", "a green circle", iterations=1)
    with pytest.raises(ValueError, match=r"Asyrp needs images \(N, C, H, W\), got shape \(3, 32, 32\)"):
        asyrp_train(D, image[0], clip, "a red circle", "a green circle", iterations=1)


def test_difflab_edit_asyrp(zoo):
    from difflab.edit import edit

    pipe, image, clip = zoo
    r = edit(pipe, "asyrp", image, prompt="a green circle", source_prompt="a red circle", clip=clip,
             steps=4, iterations=1)  # fmt: skip
    assert [c for c, _ in r.tiles] == ["input", "reconstruction (scale 0)", "output (scale 1)"]
    assert torch.isfinite(r.output).all()
    with pytest.raises(ValueError, match="asyrp boost_t .* must not exceed edit_t"):
        edit(pipe, "asyrp", image, prompt="a green circle", source_prompt="a red circle", clip=clip, steps=4,
             iterations=0, edit_t=0.3, boost_t=0.5)  # fmt: skip
    with pytest.raises(ValueError, match="asyrp needs an image-text model"):
        edit(pipe, "asyrp", image, prompt="a green circle", source_prompt="a red circle", steps=4)


def test_asyrp_needs_a_unet():
    net = create_model("DiT-T/2", image_size=8, in_channels=1)
    with pytest.raises(ValueError, match="has no UNet bottleneck"):
        h_module(net)
