"""`difflab export RUN --to diffusers OUT`: the folder loads in diffusers.DiffusionPipeline and samples
the same images as difflab for the same noise and grid; runs that do not map say why."""

import json

import pytest
import torch

from difflab.cli import main
from difflab.core.denoiser import Preconditioned
from difflab.core.schedules import EDM, vp_linear
from difflab.interop.export import export_diffusers, unet2d_config, unet2d_state_dict
from difflab.nn.unet import UNet
from difflab.pipeline import Pipeline
from difflab.zoo import ZOO_DIR

diffusers = pytest.importorskip("diffusers")


def tiny_pipeline(prediction="edm", num_classes=3, **overrides) -> Pipeline:
    """A random tiny pixel UNet (every layer kind: scale-shift resblocks, resblock up/down, attention
    at one level and in the middle, a class table with its null row) as a difflab Pipeline."""
    torch.manual_seed(0)
    kw = dict(image_size=8, in_channels=2, channels=32, channel_mult=(1, 2), num_res_blocks=1)
    kw.update(attention_resolutions=(4,), head_channels=16, num_classes=num_classes, **overrides)
    net = UNet(**kw)
    with torch.no_grad():  # zero-initialised output layers would hide a wrong mapping
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    schedule = EDM() if prediction == "edm" else vp_linear(1000)
    denoiser = Preconditioned(net, schedule, prediction).eval()
    config = {
        "model": {"arch": "unet", **{k: v for k, v in vars(net.config).items()}},
        "data": {"name": "toy", "channels": 2, "size": 8},
        "schedule": schedule.to_config(),
        "prediction": prediction,
        "train": {"label_dropout": 0.1},
    }
    return Pipeline(denoiser, config)


@pytest.mark.parametrize("resblock_updown", [True, False])
@pytest.mark.parametrize("scale_shift", [True, False])
def test_the_unet_maps_weight_for_weight(resblock_updown, scale_shift):
    from diffusers import UNet2DModel

    net = tiny_pipeline(resblock_updown=resblock_updown, use_scale_shift_norm=scale_shift).denoiser.net
    unet = UNet2DModel(**unet2d_config(net))
    state = unet2d_state_dict(net)
    assert set(state) == set(unet.state_dict())  # every weight lands, none left over
    unet.load_state_dict(state)
    x, t = torch.randn(3, 2, 8, 8), torch.tensor([0.7, -1.1, 0.0])
    want = net(x, t, class_labels=torch.tensor([0, 2, -1]))
    got = unet(x, t, class_labels=torch.tensor([0, 2, 3])).sample  # the null class is the last row
    assert want.abs().max() > 0.5
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("prediction", ["edm", "eps", "v"])
@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_diffusers_loads_the_export_and_samples_difflabs_images(tmp_path, prediction, guidance):
    from diffusers import DiffusionPipeline

    pipe = tiny_pipeline(prediction)
    out = export_diffusers(pipe, tmp_path / "export")
    ref = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    ref.set_progress_bar_config(disable=True)
    assert type(ref).__name__ == "DifflabExportPipeline"
    noise = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = dict(guidance_scale=guidance, num_inference_steps=6, latents=noise.clone(), output_type="pt")
    want = ref(3, class_labels=[0, 1, 2], **kw).images
    ref.scheduler.set_timesteps(6)
    sigmas = ref.scheduler.sigmas.double()  # EDM: the Karras grid; VP: trailing timesteps' sigmas, then 0
    if prediction != "edm":
        ts = ref.scheduler.timesteps.long()
        torch.testing.assert_close(sigmas[:-1], pipe.denoiser.schedule.sigmas[ts].double(), rtol=1e-6, atol=0)
    got = pipe(3, class_labels=[0, 1, 2], guidance_scale=guidance, sampler="euler", sigmas=sigmas, latents=noise)
    got = ((got + 1) / 2).clamp(0, 1)
    assert want.std() > 0.05
    # VP: diffusers keeps x in float32 at sigma_max = 157, where x - sigma * eps cancels to ~157^2 * 2^-23
    # = 3e-3 (difflab's sampler state is float64); the bulk of the pixels agree far closer
    atol = 1e-4 if prediction == "edm" else 5e-3
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    assert (got - want).abs().median() < 1e-5


def test_the_export_folder(tmp_path):
    out = export_diffusers(tiny_pipeline(), tmp_path / "export")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "difflab_config.json", "model_index.json", "pipeline.py", "scheduler", "unet"]
    assert list((out / "unet").glob("*.safetensors")) and not list((out / "unet").glob("*.bin"))
    card = (out / "README.md").read_text()
    assert "## Data" in card and "## Licence" in card and "DiffusionPipeline.from_pretrained" in card
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == ["pipeline", "DifflabExportPipeline"]
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export_diffusers(tiny_pipeline(), out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.parametrize(
    "name, why",
    [
        ("fmnist-dit-xs2", "DiT runs do not map: diffusers' DiTTransformer2DModel embeds the timestep"),
        ("shapes-text-unet", "text-conditional runs do not map"),
        ("shapes-text-ldm", "text-conditional runs do not map"),
    ],
)
def test_zoo_models_that_do_not_map_say_why(tmp_path, capsys, name, why):
    assert main(["export", name, "--to", "diffusers", str(tmp_path / "out")]) == 2
    assert why in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_zoo_model_exports_from_the_command_line(tmp_path, capsys):
    from diffusers import DiffusionPipeline

    out = tmp_path / "fmnist"
    assert main(["export", "fmnist-unet-s", "--to", "diffusers", str(out)]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "Fashion-MNIST" in card and "FD-FMNIST" in card and "difflab train --data fashion_mnist" in card
    ref = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    ref.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    want = ref(2, class_labels=[7, 9], num_inference_steps=4, latents=noise.clone(), output_type="pt").images
    ref.scheduler.set_timesteps(4)
    pipe = Pipeline.from_pretrained(ZOO_DIR / "fmnist-unet-s")
    got = pipe(2, class_labels=[7, 9], sampler="euler", sigmas=ref.scheduler.sigmas.double(), latents=noise)
    torch.testing.assert_close(((got + 1) / 2).clamp(0, 1), want, rtol=0, atol=1e-4)


def test_missing_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("prediction", ["edm", "eps"])
def test_an_export_loads_back_into_difflab_with_the_same_outputs(tmp_path, prediction):
    pipe = tiny_pipeline(prediction)
    back = Pipeline.from_pretrained(export_diffusers(pipe, tmp_path / "export"))
    assert back.conditioning == "class" and back.num_classes == 3 and back.label_dropout == 0.1
    sigmas = back.sigmas_for(5)
    if prediction == "edm":  # the EDM scheduler's own Karras grid; the start is sigma_max, not sqrt(sigma_max^2 + 1)
        assert back._start_scale(sigmas, 5) == pytest.approx(float(sigmas[0]))
    noise = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    kw = dict(class_labels=[0, 1, 2], guidance_scale=2.0, sampler="heun", sigmas=sigmas, latents=noise)
    # eps at sigma_max = 157: a 1e-6 float32 difference between the two UNets' kernels is 1.6e-4 in x0
    atol = 1e-4 if prediction == "edm" else 1e-3
    torch.testing.assert_close(back(3, **kw), pipe(3, **kw), rtol=0, atol=atol)
    with pytest.raises(ValueError, match="out of range"):
        back(1, class_labels=3, steps=2)
