"""DiffusionCLIP (Kim, Kwon, Ye 2022): the directional loss against its formula, the DDIM inversion
round trip on an exact Gaussian denoiser, the multi-attribute noise mix, the fine-tuning of a copy,
and `difflab edit diffusionclip` on the zoo text model with the shipped image-text model."""

import pytest
import torch

from difflab.core import EDM
from difflab.core.oracle import GaussianMixture
from difflab.methods.diffusionclip import (
    ddim_generate,
    ddim_grid,
    ddim_invert,
    diffusionclip_edit,
    diffusionclip_finetune,
    directional_clip_loss,
    mix_denoisers,
)


class LinearCLIP(torch.nn.Module):
    """A stand-in image-text model: images embed as their per-channel means, texts by a table."""

    def __init__(self):
        super().__init__()
        self.table = {"red": torch.tensor([[1.0, 0.0, 0.0]]), "green": torch.tensor([[0.0, 1.0, 0.0]])}

    def encode_image(self, x):
        return x.mean((2, 3))

    def encode_text(self, prompts):
        return self.table[prompts[0]]


def test_directional_loss_is_one_minus_the_cosine_of_the_two_directions():
    clip = LinearCLIP()
    ref = torch.zeros(1, 3, 4, 4)
    red, green = clip.encode_text(["red"]), clip.encode_text(["green"])
    toward = ref.clone()
    toward[:, 1] += 0.5
    toward[:, 0] -= 0.5  # image moved red -> green: parallel to the text direction
    away = -toward
    side = ref.clone()
    side[:, 2] += 1.0  # orthogonal
    loss = directional_clip_loss(clip, torch.cat([toward, away, side]), ref.expand(3, -1, -1, -1), green, red)
    torch.testing.assert_close(loss, torch.tensor([0.0, 2.0, 1.0]))
    # over paired crops of these flat images the directions are the same, up to the crops' pixel noise
    g = torch.Generator().manual_seed(0)
    aug = directional_clip_loss(clip, torch.cat([toward, away, side]), ref.expand(3, -1, -1, -1), green, red, 4, g)
    torch.testing.assert_close(aug, torch.tensor([0.0, 2.0, 1.0]), atol=0.05, rtol=0)


def _oracle():
    gm = GaussianMixture.random(dim=6, k=1, seed=0)

    class D(torch.nn.Module):
        schedule = EDM()

        def forward(self, x, sigma, **cond):
            return gm.denoiser(x.double(), sigma).to(x.dtype)

    return gm, D()


def test_ddim_inversion_round_trip_converges_with_the_steps():
    """Invert then regenerate on the same grid with the exact denoiser of a Gaussian: the error
    shrinks as the steps grow (the inversion is exact in the limit)."""
    gm, D = _oracle()
    x0 = gm.sample(64, generator=torch.Generator().manual_seed(1))[0].float()
    errors = []
    for steps in (5, 20, 80):
        grid = ddim_grid(D.schedule, 0.5, steps)
        assert abs(len(grid) - 1 - steps) <= 1
        x_t = ddim_invert(D, x0, grid)
        assert float((x_t - x0).abs().mean()) > 0.1  # it did move up to t0
        errors.append(float((ddim_generate(D, x_t, grid) - x0).abs().max()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.02, errors


def test_mix_denoisers_is_the_weighted_noise_prediction():
    _, D = _oracle()

    class Shift(torch.nn.Module):
        schedule = EDM()

        def forward(self, x, sigma, **cond):
            return D(x, sigma) + 1.0

    x, sigma = torch.randn(3, 6), torch.full((3,), 2.0)
    mixed = mix_denoisers([D, Shift()], [0.75, 0.25])(x, sigma)
    torch.testing.assert_close(mixed, D(x, sigma) + 0.25)
    with pytest.raises(ValueError, match="weights must sum to 1"):
        mix_denoisers([D, D], [0.5, 0.6])
    with pytest.raises(ValueError, match="one weight per model"):
        mix_denoisers([D], [0.5, 0.5])


@pytest.fixture(scope="module")
def zoo():
    from difflab.assets import asset, resolve_run
    from difflab.data.shapes import render
    from difflab.edit import load_clip
    from difflab.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(resolve_run("shapes-text-unet"))
    image = render({"shape": "square", "color": "red", "size": "large", "position": "left"})[None]
    return pipe, image, load_clip(asset("clip", "shapes"))


def test_finetuning_tunes_a_copy_and_lowers_its_loss(zoo):
    pipe, image, clip = zoo
    D = pipe.denoiser
    before = {k: v.clone() for k, v in D.state_dict().items()}
    tuned, losses = diffusionclip_finetune(
        D, image, clip, "a red square", "a green square", iterations=12, lr=3e-4, inv_steps=8, train_steps=3,
        cond=pipe.cond(""),
    )  # fmt: skip
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert all(torch.equal(before[k], v) for k, v in D.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in tuned.state_dict().items())
    # the original model through the edit path reconstructs; the tuned one changes the image
    recon = diffusionclip_edit(D, D, image, inv_steps=8, test_steps=8, cond=pipe.cond(""))
    edited = diffusionclip_edit(D, tuned, image, inv_steps=8, test_steps=8, cond=pipe.cond(""))
    assert float((edited - image).abs().mean()) > float((recon - image).abs().mean())
    with pytest.raises(ValueError, match="needs a source text and a target text"):
        diffusionclip_finetune(D, image, clip, " ", "a green square", iterations=1)


def test_difflab_edit_diffusionclip(zoo, tmp_path, capsys):
    from difflab.cli import main
    from difflab.data import save_image_grid
    from difflab.edit import edit

    pipe, image, clip = zoo
    r = edit(pipe, "diffusionclip", image, prompt="a green square", source_prompt="a red square", clip=clip,
             iterations=1, inv_steps=2, train_steps=1, test_steps=2)  # fmt: skip
    assert [c for c, _ in r.tiles] == ["input", "reconstruction (original model)", "output"]
    assert r.output.shape == (1, 3, 32, 32) and torch.isfinite(r.output).all()
    with pytest.raises(ValueError, match="diffusionclip needs an image-text model"):
        edit(pipe, "diffusionclip", image, prompt="a green square", source_prompt="a red square", iterations=1)
    with pytest.raises(ValueError, match="diffusionclip needs --source-prompt"):
        edit(pipe, "diffusionclip", image, prompt="a green square", clip=clip)
    save_image_grid(image, tmp_path / "in.png", nrow=1, padding=0)
    from difflab.assets import asset

    code = main(["edit", "diffusionclip", "--run", "shapes-text-unet", "--image", str(tmp_path / "in.png"),
                 "--prompt", "a green square", "--source-prompt", "a red square", "--clip", str(asset("clip", "shapes")),
                 "--iterations", "1", "--inv-steps", "2", "--train-steps", "1", "--test-steps", "2",
                 "--out", str(tmp_path / "o.png"), "--no-progress"])  # fmt: skip
    assert code == 0 and (tmp_path / "o.png").is_file()
