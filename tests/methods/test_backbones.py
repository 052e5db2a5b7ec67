"""Every editing method on every backbone: difflab's UNet, a DiT and a wrapped diffusers UNet.

All three are tiny (8x8 RGB, 4 tokens of 6-d context through cross-attention) with random
weights everywhere (no zero-initialised outputs, so every layer matters; peaky cross-attention,
as a trained model has). Each test checks a property the method guarantees on any network:
regions kept exactly, the low-pass of ILVR, SDEdit's limit t0 -> 0, DiffEdit's mask coming from
the text path, Prompt-to-Prompt reaching the backbone's attention through core.attention hooks.
"""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from difflab.core import EDM, Preconditioned, sample
from difflab.core.sampling import default_sigmas
from difflab.methods.blended import blended_diffusion
from difflab.methods.diffedit import diffedit, diffedit_mask
from difflab.methods.ilvr import ilvr_callback, low_pass
from difflab.methods.p2p import P2PController, prompt_to_prompt
from difflab.methods.repaint import repaint
from difflab.core.sampling import slice_sigmas
from difflab.methods.sdedit import sdedit
from difflab.nn import create_model
from difflab.nn.clip import SmallCLIP, SmallCLIPConfig

BACKBONES = ["unet", "dit", "diffusers"]
C, S, T, DIM = 3, 8, 4, 6  # channels, side, tokens, token width


@dataclass
class Backbone:
    name: str
    net: nn.Module  # the module whose attention is hooked
    D: Preconditioned
    cond_a: dict  # a prompt
    cond_b: dict  # the prompt with token 2 swapped

    def sigmas(self, n):
        return default_sigmas(self.D.schedule, n)


def _randomize(net: nn.Module, cross_key: str) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
        for name, p in net.named_parameters():
            if cross_key in name:
                p.mul_(30.0)  # peaky cross-attention maps


def _build(name: str) -> Backbone:
    torch.manual_seed(0)
    if name == "unet":
        net = create_model(
            "unet-xs",
            image_size=S,
            in_channels=C,
            channels=16,
            channel_mult=(1, 2),
            attention_resolutions=(8, 4),
            head_channels=8,
            context_dim=DIM,
        )
        _randomize(net, "cross_attn.to_k")
        D = Preconditioned(net, EDM(), "edm")
    elif name == "dit":
        net = create_model("DiT-T/2", image_size=S, in_channels=C, context_dim=DIM)
        _randomize(net, "cross_attn.to_k")
        D = Preconditioned(net, EDM(), "edm")
    else:
        diffusers = pytest.importorskip("diffusers", reason="diffusers is a test-only reference dependency")
        from difflab.interop.diffusers import diffusers_denoiser

        unet = diffusers.UNet2DConditionModel(
            sample_size=S,
            in_channels=C,
            out_channels=C,
            layers_per_block=1,
            block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=DIM,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        _randomize(unet, "attn2.to_k")
        D = diffusers_denoiser(unet)  # DDPM's linear schedule, eps prediction
        net = D.net
        assert D.schedule.sigma_max > 100 and D.prediction == "eps"
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(1, T, DIM, generator=g)
    ctx_b = ctx.clone()
    ctx_b[0, 2] = torch.randn(DIM, generator=g)
    keep = torch.ones(1, T, dtype=torch.bool)
    return Backbone(
        name, net, D.eval(), {"context": ctx, "context_mask": keep}, {"context": ctx_b, "context_mask": keep}
    )


@pytest.fixture(scope="module", params=BACKBONES)
def bb(request):
    return _build(request.param)


def _image(seed=2):
    return torch.rand(1, C, S, S, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def test_sdedit_returns_the_input_as_t0_goes_to_0_and_keeps_the_unmasked_region(bb):
    image, sig = _image(), bb.sigmas(10)
    sigma_first = float(slice_sigmas(sig, 0.1)[0])  # one step, from the smallest noise level
    near = sdedit(bb.D, image, sig, strength=0.1, cond=bb.cond_a, noise=_gen())
    far = sdedit(bb.D, image, sig, strength=1.0, cond=bb.cond_a, noise=_gen())
    err_near, err_far = (near - image).abs().max().item(), (far - image).abs().max().item()
    assert err_near < 30 * sigma_first and err_near < 0.3, (err_near, sigma_first)
    assert err_far > 10 * err_near, (err_near, err_far)
    mask = torch.zeros(1, 1, S, S)
    mask[..., : S // 2, :] = 1  # edit the top half
    out = sdedit(bb.D, image, sig, strength=0.6, edit_mask=mask, cond=bb.cond_a, noise=_gen())
    torch.testing.assert_close(out[..., S // 2 :, :], image[..., S // 2 :, :], rtol=0, atol=0)
    assert (out[..., : S // 2, :] - image[..., : S // 2, :]).abs().mean() > 0.05


@torch.no_grad()
def test_ilvr_output_has_the_references_low_frequencies(bb):
    ref, sig, N = _image(3), bb.sigmas(6), 4
    x = torch.randn(1, C, S, S, generator=_gen(4)) * float(sig[0])
    plain = sample(bb.D, x, sig, method="euler_ancestral", cond=bb.cond_a, noise=_gen(5))
    cb = ilvr_callback(ref, N, noise=_gen(6))
    out = sample(bb.D, x, sig, method="euler_ancestral", cond=bb.cond_a, callback=cb, noise=_gen(5))
    err = (low_pass(out, N) - low_pass(ref, N)).abs().max().item()
    err_plain = (low_pass(plain, N) - low_pass(ref, N)).abs().max().item()
    assert err < 1e-4 and err_plain > 0.1, (err, err_plain)
    assert (out - low_pass(out, N)).abs().mean() > 1e-3  # the high frequencies are the model's own


@torch.no_grad()
def test_repaint_keeps_the_known_region_exactly(bb):
    image, sig = _image(), bb.sigmas(6)
    keep = torch.zeros(1, 1, S, S)
    keep[..., :, : S // 2] = 1  # the left half is known
    out = repaint(bb.D, image, keep, sig, jump_length=2, jump_n_sample=2, cond=bb.cond_a, noise=_gen())
    torch.testing.assert_close(out * keep, image * keep, rtol=0, atol=0)
    assert torch.isfinite(out).all() and (out - image)[..., S // 2 :].abs().mean() > 0.05


def test_blended_keeps_the_background_exactly_and_ranks(bb):
    torch.manual_seed(0)
    clip = (
        SmallCLIP(
            SmallCLIPConfig(
                vocab=["a", "red", "circle"],
                image_size=S,
                channels=8,
                dim=16,
                text_dim=16,
                text_depth=1,
                noise_aware=False,
            )
        )
        .eval()
        .requires_grad_(False)
    )
    image, sig = _image(), bb.sigmas(6)
    mask = torch.zeros(1, 1, S, S)
    mask[..., 2:6, 2:6] = 1
    outs, sims = blended_diffusion(
        bb.D,
        clip,
        image,
        mask,
        "a red circle",
        sig,
        scale=50.0,
        n_aug=2,
        n_candidates=2,
        cond=bb.cond_a,
        noise=_gen(1),
        aug_generator=_gen(2),
    )
    assert outs.shape == (2, C, S, S) and sims[0] >= sims[1] and not outs.requires_grad
    torch.testing.assert_close(outs * (1 - mask), image.expand_as(outs) * (1 - mask), rtol=0, atol=0)
    assert ((outs - image) * mask).abs().mean() > 0.01


@torch.no_grad()
def test_diffedit_mask_comes_from_the_prompts_and_the_rest_is_kept_exactly(bb):
    image, sig = _image(), bb.sigmas(8)
    sigma = float(slice_sigmas(sig, 0.5)[0])
    mask = diffedit_mask(bb.D, image, bb.cond_b, bb.cond_a, sigma=sigma, n_draws=2, generator=_gen())
    assert set(mask.unique().tolist()) == {0.0, 1.0}  # the prompts' predictions differ, unevenly
    same = diffedit_mask(bb.D, image, bb.cond_a, bb.cond_a, sigma=sigma, n_draws=2, generator=_gen())
    assert same.sum() == 0  # identical prompts: no difference anywhere
    out = diffedit(bb.D, image, mask, sig, bb.cond_b, bb.cond_a, strength=0.5)
    torch.testing.assert_close(out * (1 - mask), image * (1 - mask), rtol=0, atol=0)
    assert ((out - image) * mask).abs().sum() > 0


@torch.no_grad()
def test_p2p_without_an_edit_is_plain_sampling_and_the_swap_reaches_the_attention(bb):
    sig = bb.sigmas(5)
    n = len(sig) - 1
    x = torch.randn(1, C, S, S, generator=_gen(7)) * float(sig[0])
    both = {k: torch.cat([bb.cond_a[k], bb.cond_a[k]]) for k in bb.cond_a}
    ctl = P2PController(2, n, cross_replace=0.8, self_replace=0.4, self_max_pixels=64)
    out = prompt_to_prompt(bb.D, bb.net, x, sig, both, ctl, method="euler")
    plain_a = sample(bb.D, x, sig, method="euler", cond=bb.cond_a)
    torch.testing.assert_close(out, plain_a.expand(2, -1, -1, -1), rtol=1e-4, atol=1e-4)
    assert ctl.step == n and ctl.token_maps().shape[:2] == (2, T)  # cross maps seen with their (h, w)

    swap = {k: torch.cat([bb.cond_a[k], bb.cond_b[k]]) for k in bb.cond_a}
    ctl = P2PController(2, n, cross_replace=1.0, self_replace=0.0)
    out = prompt_to_prompt(bb.D, bb.net, x, sig, swap, ctl, method="euler")
    plain_b = sample(bb.D, x, sig, method="euler", cond=bb.cond_b)
    torch.testing.assert_close(out[0], plain_a[0], rtol=1e-4, atol=1e-4)  # the source is never changed
    assert (out[1] - plain_b[0]).abs().max() > 1e-3  # the edit runs on the source's cross-attention
