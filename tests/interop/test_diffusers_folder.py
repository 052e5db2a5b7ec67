"""A diffusers pipeline folder (Stable Diffusion layout) as a difflab Pipeline: built here with
diffusers and transformers at tiny random sizes (nothing downloaded; the CLIP tokenizer's vocabulary
is written by the test), loaded by `Pipeline.from_pretrained`, and checked against diffusers' own
StableDiffusionPipeline on the same latents, prompt and scheduler settings."""

import json
import shutil

import pytest
import torch

from difflab.cli import main
from difflab.core.sampling import SAMPLERS
from difflab.pipeline import Pipeline

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def tiny_vae():
    """An AutoencoderKL of factor 2 for 16x16 RGB images and 4-channel 8x8 latents (random weights)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        latent_channels=4,
        sample_size=16,
    )


def tiny_sd_folder(root, max_length: int = 16):
    """A StableDiffusionPipeline folder: CLIP text model (2 layers, 32-d, `max_length` tokens),
    UNet2DConditionModel (32/64 channels, 8x8 latents), AutoencoderKL (factor 2, 16x16 images), DDIM
    scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=max_length)
    torch.manual_seed(0)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=max_length,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    vae = tiny_vae()
    with torch.no_grad():  # no zero-initialised layers: every part of the networks matters
        for module in (unet, vae):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "sd", safe_serialization=True)
    return root / "sd"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_sd_folder(tmp_path_factory.mktemp("diffusers"))


@pytest.fixture(scope="module")
def pipe(folder):
    return Pipeline.from_pretrained(folder)


SCHEDULERS = {  # diffusers scheduler (and config changes) -> the difflab sampler that is the same method
    "ddim": ("DDIMScheduler", {}, "euler"),
    "ddim_final_alpha": ("DDIMScheduler", {"set_alpha_to_one": False}, "euler"),  # SD v1's setting
    "euler": ("EulerDiscreteScheduler", {}, "euler"),
    # linspace: unit latents times sigma_max (not sqrt(sigma^2 + 1)); 7 steps: fractional timesteps 832.5, ...
    "euler_linspace": ("EulerDiscreteScheduler", {"timestep_spacing": "linspace"}, "euler"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "dpmpp_2m"),
}


def with_scheduler(folder, root, name: str, table: dict | None = None, prefix: str = ""):
    """A copy of the folder whose scheduler is table[name] (default SCHEDULERS; model_index.json updated)."""
    import diffusers

    cls, changes, _ = (table or SCHEDULERS)[name]
    dst = root / f"{prefix}{name}"
    if not dst.exists():
        shutil.copytree(folder, dst)
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        getattr(diffusers, cls).from_config(config, **changes).save_pretrained(dst / "scheduler")
        index = json.loads((dst / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", cls]
        (dst / "model_index.json").write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_samplers_equal_the_diffusers_pipeline(folder, tmp_path_factory, name, guidance):
    from diffusers import StableDiffusionPipeline

    variant = with_scheduler(folder, tmp_path_factory.getbasetemp(), name)
    steps = 7 if name == "euler_linspace" else 4
    ref = StableDiffusionPipeline.from_pretrained(variant, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    prompts = ["a cat", "a red dog"]
    want = (
        ref(
            prompts, num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(), output_type="pt"
        ).images
        * 2
        - 1
    )
    got = Pipeline.from_pretrained(variant)(
        2, prompt=prompts, steps=steps, sampler=SCHEDULERS[name][2], guidance_scale=guidance, latents=latents
    )
    assert want.std() > 0.05  # the images are not flat: the comparison can fail
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_the_folder_maps_to_difflab_pieces(pipe):
    assert pipe.conditioning == "text" and pipe.image_shape() == (3, 16, 16) and pipe.sample_shape() == (4, 8, 8)
    assert pipe.denoiser.prediction == "eps" and pipe.denoiser.schedule.T == 1000
    sigmas = pipe.sigmas_for(4)
    ts = [751, 501, 251, 1]  # DDIM "leading" spacing with steps_offset 1
    torch.testing.assert_close(sigmas[:-1], pipe.denoiser.schedule.sigmas[ts])
    states, mask = pipe.encode_prompts(["a cat"])
    assert states.shape == (1, 16, 32) and mask.all()
    with pytest.raises(ValueError, match="is 32 tokens; the text encoder takes 16"):
        pipe.encode_prompts(["a" * 30])
    assert pipe.encode_prompts(["a" * 30], truncate=True)[0].shape == (1, 16, 32)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_on_it(pipe, sampler):
    x = pipe(1, prompt="a cat", steps=3, sampler=sampler, guidance_scale=2.0, seed=0)
    assert x.shape == (1, 3, 16, 16) and torch.isfinite(x).all()


def test_difflab_sample_takes_the_folder(folder, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert (
        main(["sample", "--run", str(folder), "--prompt", "a cat", "--n", "2", "--steps", "2", "--out", str(out)]) == 0
    )
    assert out.exists()


def _broken(folder, tmp_path, change):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    change(bad)
    return bad


def test_bad_folders_are_one_line_errors(folder, tmp_path):
    def edit_index(bad, **changes):
        index = json.loads((bad / "model_index.json").read_text())
        index.update(changes)
        (bad / "model_index.json").write_text(json.dumps(index))

    cases = [
        (lambda b: shutil.rmtree(b / "vae"), FileNotFoundError, r"has no vae/ folder"),
        (
            lambda b: edit_index(b, scheduler=["diffusers", "FancyScheduler"]),
            ValueError,
            r"scheduler: FancyScheduler is not supported here; supported: DDIMScheduler",
        ),
        (lambda b: edit_index(b, unet=None), ValueError, r"names no unet component"),
        (
            lambda b: [p.rename(p.with_suffix(".bin")) for p in (b / "unet").glob("*.safetensors")],
            ValueError,
            r"holds only pickle weights \(diffusion_pytorch_model.bin\); difflab loads safetensors only",
        ),
    ]
    for i, (change, error, message) in enumerate(cases):
        bad = _broken(folder, tmp_path / str(i), change)
        with pytest.raises(error, match=message):
            Pipeline.from_pretrained(bad)


def test_mismatched_components_are_named(folder, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    def wider_text_encoder(bad):
        shutil.rmtree(bad / "text_encoder")
        config = CLIPTextConfig(
            vocab_size=54,
            hidden_size=48,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=1,
            max_position_embeddings=16,
        )
        CLIPTextModel(config).save_pretrained(bad / "text_encoder", safe_serialization=True)

    bad = _broken(folder, tmp_path, wider_text_encoder)
    with pytest.raises(ValueError, match=r"the text encoder gives 48-d states, the UNet's cross-attention takes 32"):
        Pipeline.from_pretrained(bad)


# --------------------------------------------------------------------------------------------
# Editing methods on the folder (latent space, the mask pooled, kept pixels pasted back)
# --------------------------------------------------------------------------------------------

EDITS = {
    "sdedit": {"strength": 0.6, "prompt": "a cat"},
    "repaint": {"jump_length": 2, "jump_n_sample": 2, "prompt": "a cat"},
    "ilvr": {"factor": 2, "prompt": "a cat"},
    "diffedit": {"prompt": "a red cat", "source_prompt": "a cat", "n_draws": 2},
    "p2p": {"prompt": "a dog", "source_prompt": "a cat", "self_replace": 0.5},
    "imagic": {"prompt": "a red cat", "embed_steps": 2, "tune_steps": 2, "sweep": "0", "batch": 2},
    "unitune": {"prompt": "a red cat", "tune_steps": 2, "batch": 2, "blend": 0.2},
}
MASKED = {"sdedit": "edit", "repaint": "keep"}


def _image():
    g = torch.Generator().manual_seed(1)
    return torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear")


@pytest.mark.parametrize("method", list(EDITS))
def test_editing_methods_run_on_it(pipe, method):
    from difflab.edit import edit

    image = _image()
    mask = None
    if method in MASKED:
        mask = torch.zeros(1, 1, 16, 16)
        mask[..., :, :7] = 1  # not aligned with the 2x2 latent pixels: pooling decides the border column
    result = edit(pipe, method, image, mask=mask, steps=4, seed=0, **EDITS[method])
    out = result.output
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    assert all(t.shape == (1, 3, 16, 16) for _, t in result.tiles)  # latent tiles are decoded for the strip
    if mask is not None:
        keep = mask if MASKED[method] == "keep" else 1 - mask
        assert torch.equal(out * keep, image.clamp(-1, 1) * keep)  # the kept pixels are the input's, exactly
        assert (out - image).abs().mul(1 - keep).max() > 1e-3  # and the rest was edited


def test_p2p_injection_reaches_the_diffusers_attention(pipe):
    """Injecting the source's attention changes the edit (were the controller not reaching the
    wrapped diffusers UNet's attention layers, both runs would be the same numbers), and the
    regenerated source does not depend on it."""
    from difflab.edit import edit

    def run(replace):
        r = edit(
            pipe,
            "p2p",
            _image(),
            prompt="a dog",
            source_prompt="a cat",
            steps=4,
            seed=0,
            cross_replace=replace,
            self_replace=replace,
        )
        return r.output, dict(r.tiles)["source (inverted and regenerated)"]

    (injected, source_a), (free, source_b) = run(1.0), run(0.0)
    torch.testing.assert_close(source_a, source_b, rtol=0, atol=1e-6)
    assert (injected - free).abs().max() > 1e-3


def test_blended_runs_on_the_latents_with_a_transformers_clip(pipe, tmp_path):
    from difflab.edit import edit, load_clip
    from tests.metrics.test_clip_score import tiny_clip_folder

    clip = load_clip(tiny_clip_folder(tmp_path))  # transformers CLIP behind difflab's image-text interface
    image, mask = _image(), torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1  # white = edit
    r = edit(pipe, "blended", image, mask=mask, prompt="a cat", clip=clip, steps=3, candidates=2, n_aug=2)
    assert r.output.shape == (1, 3, 16, 16) and torch.isfinite(r.output).all()
    assert torch.equal(r.output[..., :4, :], image[..., :4, :])  # the background pixels are the input's
    assert (r.output - image)[..., 4:12, 4:12].abs().max() > 1e-3 and len(r.info["scores"]) == 2


def test_difflab_edit_takes_the_folder(folder, tmp_path, capsys):
    from difflab.data import save_image_grid

    save_image_grid(_image(), tmp_path / "in.png", nrow=1, padding=0)
    out = tmp_path / "out.png"
    args = ["edit", "sdedit", "--run", str(folder), "--image", str(tmp_path / "in.png"), "--out", str(out)]
    assert main([*args, "--prompt", "a cat", "--steps", "3", "--no-progress"]) == 0
    assert out.exists() and out.with_name("out_strip.png").exists()


# --------------------------------------------------------------------------------------------
# A pixel UNet2DModel folder (DDPMPipeline / DDIMPipeline layout)
# --------------------------------------------------------------------------------------------


def tiny_pixel_folder(root, num_class_embeds=None):
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=num_class_embeds,
    )
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(root, safe_serialization=True)
    return root


def test_a_pixel_unet_folder_equals_the_ddim_pipeline(tmp_path):
    from diffusers import DDIMPipeline

    folder = tiny_pixel_folder(tmp_path / "ddim")
    ref = DDIMPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    images = ref(
        batch_size=2, generator=torch.Generator().manual_seed(0), eta=0.0, num_inference_steps=5, output_type="np"
    ).images
    want = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.conditioning == "none" and pipe.image_shape() == (3, 16, 16)
    latents = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # what DDIMPipeline draws
    got = pipe(2, steps=5, sampler="euler", latents=latents)
    assert want.std() > 0.05
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_a_class_unet_folder_samples_classes_and_refuses_guidance(tmp_path):
    pipe = Pipeline.from_pretrained(tiny_pixel_folder(tmp_path / "classes", num_class_embeds=3))
    assert pipe.conditioning == "class" and pipe.num_classes == 3
    x = pipe(3, class_labels=[0, 1, 2], steps=2, seed=0)
    assert torch.isfinite(x).all() and (x[0] - x[1]).abs().max() > 1e-4  # the label reaches the UNet
    with pytest.raises(ValueError, match="class embedding has no null class"):
        pipe(1, class_labels=0, steps=2, guidance_scale=2.0)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_on_a_pixel_unet_folder(tmp_path_factory, sampler):
    root = tmp_path_factory.getbasetemp() / "pixel-every-sampler"
    folder = root if (root / "model_index.json").exists() else tiny_pixel_folder(root)
    x = Pipeline.from_pretrained(folder)(2, steps=3, sampler=sampler, seed=0)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()


@pytest.mark.parametrize("method", ["sdedit", "repaint", "ilvr", "blended"])  # the methods an unconditional model takes
def test_editing_methods_run_on_a_pixel_unet_folder(tmp_path, method):
    from difflab.edit import edit, load_clip
    from tests.metrics.test_clip_score import tiny_clip_folder

    pipe = Pipeline.from_pretrained(tiny_pixel_folder(tmp_path / "ddim"))
    image, mask = _image(), None
    kw = {"ilvr": {"factor": 2}, "repaint": {"jump_length": 2, "jump_n_sample": 2}}.get(method, {})
    if method != "ilvr":
        mask = torch.zeros(1, 1, 16, 16)
        mask[..., :, :7] = 1
    if method == "blended":
        kw = {"prompt": "a cat", "candidates": 2, "n_aug": 2, "clip": load_clip(tiny_clip_folder(tmp_path / "clip"))}
    r = edit(pipe, method, image, mask=mask, steps=3, seed=0, **kw)
    assert r.output.shape == (1, 3, 16, 16) and torch.isfinite(r.output).all()
    if mask is not None:
        keep = mask if method == "repaint" else 1 - mask
        assert torch.equal(r.output * keep, image.clamp(-1, 1) * keep)


@pytest.mark.parametrize("method", ["diffusionclip", "asyrp"])
def test_clip_directed_editors_run_on_it(pipe, method, tmp_path):
    """DiffusionCLIP fine-tunes a copy of the wrapped diffusers UNet through the VAE decoder; Asyrp
    shifts its mid_block (h-space): both run on the SD-layout folder."""
    from difflab.edit import edit, load_clip
    from tests.metrics.test_clip_score import tiny_clip_folder

    clip = load_clip(tiny_clip_folder(tmp_path / "clip"))
    kw = {"diffusionclip": {"iterations": 1, "inv_steps": 2, "train_steps": 1, "test_steps": 2},
          "asyrp": {"iterations": 1, "edit_t": 0.9}}[method]  # fmt: skip
    before = {k: v.clone() for k, v in pipe.denoiser.state_dict().items()}
    r = edit(pipe, method, _image(), prompt="a red cat", source_prompt="a cat", clip=clip, steps=4, **kw)
    assert r.output.shape == (1, 3, 16, 16) and torch.isfinite(r.output).all()
    assert all(torch.equal(before[k], v) for k, v in pipe.denoiser.state_dict().items())
