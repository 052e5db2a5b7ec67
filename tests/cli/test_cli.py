"""The `difflab` command: help pages, and bad inputs as one-line errors with exit status 2.

Each test starts `python -m difflab` (~1.5 s of imports), so there are few; the errors themselves
are tested in-process in tests/train/test_errors.py.
"""

import shutil

import pytest

from tests.train.helpers import difflab_cli, tiny_config, write_config


@pytest.mark.parametrize("command", ["train", "sample", "demo"])
def test_help_exits_zero(command):
    proc = difflab_cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: difflab {command}")


def _assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def test_sample_with_unknown_sampler_is_an_argparse_error(tiny_run):
    proc = difflab_cli("sample", "--run", str(tiny_run), "--sampler", "eulr")
    _assert_clean_error(proc, "difflab sample: error: argument --sampler: invalid choice: 'eulr'")


def test_sample_with_label_out_of_range(tiny_run, tmp_path):
    proc = difflab_cli("sample", "--run", str(tiny_run), "--label", "10", "--out", str(tmp_path / "x.png"))
    _assert_clean_error(proc, "difflab sample: error: class label 10 out of range [0, 10)")
    assert not (tmp_path / "x.png").exists()


def test_sample_from_missing_run_folder(tmp_path):
    proc = difflab_cli("sample", "--run", str(tmp_path / "nowhere"))
    _assert_clean_error(proc, "difflab sample: error: run folder", "nowhere does not exist")


def test_train_resume_with_truncated_checkpoint(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    ckpt = run / "checkpoint.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    config = write_config(tiny_config(steps=5), tmp_path / "cfg.json")
    proc = difflab_cli("train", "--config", str(config), "--out", str(run), "--resume", "--no-progress")
    _assert_clean_error(proc, "difflab train: error:", f"{ckpt} is not a readable safetensors file")


def test_train_resume_with_changed_model_and_unknown_names(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    config = write_config(tiny_config(steps=5), tmp_path / "cfg.json")
    proc = difflab_cli(
        "train", "--config", str(config), "--out", str(run), "--resume", "--model", "unet-s", "--no-progress"
    )
    _assert_clean_error(
        proc, "difflab train: error: --resume: model differs from the checkpoint's ('unet-xs' there, 'unet-s' now)"
    )
    proc = difflab_cli("train", "--out", str(tmp_path / "new"), "--data", "mnist", "--no-progress")
    _assert_clean_error(proc, "difflab train: error: unknown dataset 'mnist'")
