"""A diffusers DiT folder (DiTPipeline: DiTTransformer2DModel on AutoencoderKL latents) as a difflab
Pipeline: built here at tiny random sizes, loaded by `Pipeline.from_pretrained`, and checked against
diffusers' own DiTPipeline on the same noise, classes and scheduler settings."""

import json
import shutil

import pytest
import torch

from difflab.cli import main
from difflab.core.sampling import SAMPLERS
from difflab.pipeline import Pipeline
from tests.interop.test_diffusers_folder import tiny_vae

diffusers = pytest.importorskip("diffusers")


def tiny_dit_folder(root, learn_sigma: bool = True):
    """DiTPipeline folder: a 2-layer DiT (hidden 32, patch 2, 8x8x4 latents; 1000 classes + the null
    row, as the ImageNet models), an AutoencoderKL (factor 2: 16x16 images) and a DDIM scheduler."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8 if learn_sigma else 4,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    vae = tiny_vae()
    with torch.no_grad():  # adaLN-Zero starts at zero: make every layer matter
        for module in (transformer, vae):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(root, safe_serialization=True)
    index = json.loads((root / "model_index.json").read_text())
    index["id2label"] = {"0": "tench, Tinca tinca", "1": "goldfish", "2": "great white shark"}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_dit_folder(tmp_path_factory.mktemp("dit") / "dit")


SCHEDULERS = {  # diffusers scheduler -> the difflab sampler that is the same method
    "ddim": ("DDIMScheduler", {}, "euler"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "dpmpp_2m"),
}


def _with_scheduler(folder, root, name):
    from tests.interop.test_diffusers_folder import with_scheduler

    return with_scheduler(folder, root, name, SCHEDULERS, prefix="dit-")


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_samplers_equal_the_dit_pipeline(folder, tmp_path_factory, name, guidance):
    from diffusers import DiTPipeline

    variant = _with_scheduler(folder, tmp_path_factory.getbasetemp(), name)
    ref = DiTPipeline.from_pretrained(variant)
    ref.set_progress_bar_config(disable=True)
    classes = [1, 2]
    out = ref(
        classes,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(5),
        num_inference_steps=4,
        output_type="pt",
    )
    want = out.images * 2 - 1
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))  # what DiTPipeline draws
    pipe = Pipeline.from_pretrained(variant)
    got = pipe(2, class_labels=classes, steps=4, sampler=SCHEDULERS[name][2], guidance_scale=guidance, latents=noise)
    assert want.std() > 0.05  # not flat: the comparison can fail
    torch.testing.assert_close(got.clamp(-1, 1), want, rtol=0, atol=2e-5)


def test_the_folder_maps_to_difflab_pieces(folder):
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.conditioning == "class" and pipe.num_classes == 1000 and pipe.denoiser.learned_variance
    assert pipe.image_shape() == (3, 16, 16) and pipe.sample_shape() == (4, 8, 8)
    assert pipe.class_names[:3] == ["tench", "goldfish", "great white shark"]
    assert pipe.cond("goldfish")["class_labels"].item() == 1
    net = pipe.denoiser.net
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    null = net(x, t, class_labels=torch.tensor([-1]))  # difflab's null label is the table's row 1000
    torch.testing.assert_close(null, net.unet(x, t, class_labels=torch.tensor([1000])).sample)
    assert (null - net(x, t, class_labels=torch.tensor([3]))).abs().max() > 1e-3


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_on_it(folder, sampler):
    pipe = Pipeline.from_pretrained(folder)
    x = pipe(2, class_labels=[0, 7], steps=3, sampler=sampler, guidance_scale=2.0, seed=0)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()


def test_difflab_sample_and_edit_take_the_folder(folder, tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = ["--run", str(folder), "--n", "2", "--steps", "3", "--label", "1", "--guidance", "2", "--out", str(out)]
    assert main(["sample", *args]) == 0 and out.is_file()
    image = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 40, 40)).save(image)
    edited = tmp_path / "edit.png"
    args = ["--run", str(folder), "--image", str(image), "--prompt", "tench", "--steps", "3", "--out", str(edited)]
    assert main(["edit", "sdedit", *args]) == 0 and edited.is_file()


def test_bad_dit_folders_are_one_line_errors(folder, tmp_path):
    bad = tmp_path / "no-vae"
    shutil.copytree(folder, bad)
    shutil.rmtree(bad / "vae")
    with pytest.raises(FileNotFoundError, match="has no vae/ folder"):
        Pipeline.from_pretrained(bad)
    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    weights = next((pickled / "transformer").glob("*.safetensors"))
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ValueError, match="holds only pickle weights"):
        Pipeline.from_pretrained(pickled)


def test_mismatched_dit_components_are_named(folder, tmp_path):
    from diffusers import AutoencoderKL

    bad = tmp_path / "mismatch"
    shutil.copytree(folder, bad)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(32,),
        latent_channels=3,
    )
    vae.save_pretrained(bad / "vae", safe_serialization=True)
    with pytest.raises(ValueError, match="the VAE makes 3-channel latents, the transformer takes 4 channels"):
        Pipeline.from_pretrained(bad)
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler is not supported here"):
        Pipeline.from_pretrained(bad)


DIT_EDITS = {  # every registry method that fits a class-conditional model (p2p needs a text model's tokens)
    "sdedit": {"strength": 0.6, "prompt": "goldfish"},
    "repaint": {"jump_length": 2, "jump_n_sample": 2, "prompt": "goldfish"},
    "ilvr": {"factor": 2},
    "diffedit": {"prompt": "goldfish", "source_prompt": "tench", "n_draws": 2},
    "blended": {"prompt": "a cat", "candidates": 2, "n_aug": 2},
}


@pytest.mark.parametrize("method", list(DIT_EDITS))
def test_editing_methods_run_on_it(folder, method, tmp_path):
    from difflab.edit import edit, load_clip
    from tests.metrics.test_clip_score import tiny_clip_folder

    pipe = Pipeline.from_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear")
    mask = None
    if method in ("sdedit", "repaint", "blended"):
        mask = torch.zeros(1, 1, 16, 16)
        mask[..., :, :8] = 1
    kw = dict(DIT_EDITS[method])
    if method == "blended":
        kw["clip"] = load_clip(tiny_clip_folder(tmp_path))
    r = edit(pipe, method, image, mask=mask, steps=3, seed=0, **kw)
    assert r.output.shape == (1, 3, 16, 16) and torch.isfinite(r.output).all()
    if mask is not None:
        keep = mask if method == "repaint" else 1 - mask  # RePaint's white = keep, the others' white = edit
        assert torch.equal(r.output * keep, image * keep)
