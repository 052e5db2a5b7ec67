"""Bad inputs give one clear error that names the culprit, not a deep traceback."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from difflab.core.losses import DenoisingLoss, lognormal
from difflab.data import ImageData, load_dataset
from difflab.pipeline import Pipeline
from difflab.train import train
from difflab.train.loop import _new_denoiser
from tests.train.helpers import tiny_config


@pytest.fixture
def run(tiny_run, tmp_path):
    """A private copy of the tiny run, free to damage."""
    return shutil.copytree(tiny_run, tmp_path / "run")


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0001])
def test_truncated_checkpoint_on_resume(run, keep):
    _truncate(run / "checkpoint.safetensors", keep)
    with pytest.raises(ValueError, match="checkpoint.safetensors is not a readable safetensors file"):
        train(tiny_config(steps=5), run, resume=True, progress=False)


@pytest.mark.parametrize("name, weights", [("model.safetensors", "ema"), ("checkpoint.safetensors", "raw")])
def test_truncated_weights_on_from_pretrained(run, name, weights):
    _truncate(run / name)
    with pytest.raises(ValueError, match=f"{name} is not a readable safetensors file"):
        Pipeline.from_pretrained(run, weights=weights)


def test_foreign_safetensors(run):
    foreign = {"encoder.weight": torch.zeros(4, 4), "encoder.bias": torch.zeros(4)}
    save_file(foreign, str(run / "checkpoint.safetensors"))
    with pytest.raises(ValueError, match="checkpoint.safetensors is not a difflab checkpoint"):
        train(tiny_config(steps=5), run, resume=True, progress=False)
    save_file(foreign, str(run / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"model.safetensors does not fit the network of this run: tensors \d+ missing"
    ):
        Pipeline.from_pretrained(run)


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"format": "difflab-chec', "config.json is not valid JSON"),
        ("[1, 2]", "config.json is not a difflab run config"),
        ('{"format": "other"}', "config.json is not a difflab run config"),
    ],
)
def test_corrupt_config_json(run, text, match):
    (run / "config.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        Pipeline.from_pretrained(run)


def test_config_json_with_a_broken_model_section(run):
    config = json.loads((run / "config.json").read_text())
    config["model"]["channels"] = "many"
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json does not describe a buildable model"):
        Pipeline.from_pretrained(run)
    del config["schedule"]
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json lacks the field\(s\) \[.schedule.\]"):
        Pipeline.from_pretrained(run)


def test_missing_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="run folder .*nowhere does not exist"):
        Pipeline.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="run folder .*nowhere does not exist"):
        train(tiny_config(), tmp_path / "nowhere", resume=True, progress=False)
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*empty/checkpoint.safetensors"):
        train(tiny_config(), tmp_path / "empty", resume=True, progress=False)


@pytest.mark.parametrize(
    "change, what",
    [
        (dict(model="unet-s"), "model"),
        (dict(model_overrides={"channels": 32}), "model_overrides"),
        (dict(batch_size=32), "batch_size"),
        (dict(seed=1), "seed"),
    ],
)
def test_resume_with_a_changed_run(run, change, what):
    with pytest.raises(ValueError, match=f"--resume: {what} differs from the checkpoint's"):
        train(tiny_config(steps=5, **change), run, resume=True, progress=False)


def test_unknown_dataset_and_model(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; known: digits, fashion_mnist"):
        train(tiny_config(data="mnist"), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="unknown model name 'unet-xxl'; known: .*'unet-xs'"):
        train(tiny_config(model="unet-xxl"), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        from difflab.train import TrainConfig

        TrainConfig.from_dict({"modle": "unet-xs"})


def test_nan_in_data(tmp_path):
    data = load_dataset("digits", "train")
    images = data.images.clone()
    images[7, 0, 3, 3] = float("nan")
    bad = ImageData(images, data.labels, data.class_names, name="digits")
    with pytest.raises(ValueError, match="NaN/inf pixels in 1 image.*first at index 7"):
        train(tiny_config(), tmp_path / "nan", data=bad, progress=False)
    # and the loss itself refuses a non-finite batch (for loops other than ours)
    denoiser = _new_denoiser(tiny_config(), data)
    with pytest.raises(ValueError, match="training batch x0 contains NaN/inf"):
        DenoisingLoss(lognormal())(denoiser, images[:8], class_labels=data.labels[:8])


def test_diverging_loss_stops_with_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"lr must be a finite number in \(0, 1\], got inf"):
        train(tiny_config(lr=float("inf"), warmup=1, grad_clip=0.0, steps=3), tmp_path / "inf", progress=False)
    with pytest.raises(ValueError, match=r"lr must be a finite number in \(0, 1\], got 1e\+38"):
        train(tiny_config(lr=1e38), tmp_path / "huge", progress=False)
    # finite data whose squares overflow float32: the loss of the first step is inf
    data = load_dataset("digits", "train")
    huge = ImageData(data.images * 1e20, data.labels, data.class_names, name="digits")
    with pytest.raises(FloatingPointError, match="loss is (nan|inf) at step 1; lower lr"):
        train(tiny_config(steps=3), tmp_path / "overflow", data=huge, progress=False)


def test_bad_sampling_arguments(tiny_run):
    pipe = Pipeline.from_pretrained(tiny_run)
    with pytest.raises(ValueError, match=r"class label 10 out of range \[0, 10\)"):
        pipe(2, class_labels=[3, 10], steps=2)
    with pytest.raises(ValueError, match=r"class label -1 out of range"):
        pipe(1, class_labels=-1, steps=2)
    with pytest.raises(ValueError, match="unknown sampler 'eulr'; known: .*euler"):
        pipe(2, sampler="eulr", steps=2)
