"""`difflab train-clip`: writes a folder that loads back (clean and noise-aware towers) and whose
metrics the loaded models reproduce; bad inputs end with one clear line and exit status 2."""

import json

import pytest
import torch

from difflab.cli import build_parser, main
from difflab.data import load_dataset
from difflab.nn.clip import SmallCLIP, SmallCLIPConfig
from difflab.train.clip import _retrieval, clip_metrics, load_clip, save_clip

TINY = {"n": 64, "size": 16}


def _run(capsys, *argv):
    """(exit status, stdout, stderr) of `difflab ARGV` in this process."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors and --help
        rc = e.code if isinstance(e.code, int) else 2
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "clip"
    rc = main(
        [
            "train-clip",
            "--data-kwargs",
            json.dumps(TINY),
            "--steps",
            "3",
            "--noise-steps",
            "2",
            "--batch-size",
            "16",
            "--eval-n",
            "100",
            "--seed",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    return out


def test_help_page(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train-clip", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for fragment in ("--steps", "--noise-steps", "--seed", "--out", "--no-progress", "retrieval top-1"):
        assert fragment in text, fragment


def test_folder_loads_back_and_reproduces_its_metrics(folder):
    meta = json.loads((folder / "config.json").read_text())
    assert meta["kind"] == "clip" and meta["model"]["arch"] == "small_clip" and meta["model"]["image_size"] == 16
    info = meta["info"]
    assert info["steps"] == 3 and info["noise_steps"] == 2 and info["seed"] == 1 and info["seconds"] >= 0
    assert set(info["metrics"]["noisy_retrieval"]) == {"0", "0.5", "2"}
    clean, noisy = load_clip(folder), load_clip(folder, noise_aware=True)
    # one text tower, two image towers
    torch.testing.assert_close(
        noisy.encode_text(["a red circle on the left"]), clean.encode_text(["a red circle on the left"]), rtol=0, atol=0
    )
    assert not torch.equal(noisy.stem.weight, clean.stem.weight)
    test = load_dataset("shapes", "test", **{**TINY, "n": 100})
    again = clip_metrics(clean, noisy, test, seed=1)
    assert json.loads(json.dumps(again)) == info["metrics"]


def test_corrupt_or_missing_folder_gives_clear_errors(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist .train one with `difflab train-clip"):
        load_clip(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    (bad / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        load_clip(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_clip(bad)


def test_a_folder_without_the_noise_aware_tower_says_so(tmp_path):
    from difflab.edit import save_clip as save_flat

    clip = SmallCLIP(
        SmallCLIPConfig(vocab=["a", "red", "circle"], image_size=8, channels=8, dim=16, text_dim=16, text_depth=1)
    )
    save_clip(clip, tmp_path / "c")
    assert torch.equal(load_clip(tmp_path / "c").stem.weight, clip.stem.weight)
    save_flat(clip, tmp_path / "flat")  # the older flat layout of `difflab edit blended --clip` loads too
    assert torch.equal(load_clip(tmp_path / "flat").stem.weight, clip.stem.weight)
    with pytest.raises(ValueError, match="holds no noise-aware image tower"):
        load_clip(tmp_path / "c", noise_aware=True)


def test_data_set_without_captions_is_a_clean_error(capsys, tmp_path):
    rc, _, err = _run(capsys, "train-clip", "--data", "digits", "--steps", 1, "--out", tmp_path / "c", "--no-progress")
    assert rc == 2 and "Traceback" not in err
    assert "difflab train-clip: error: dataset 'digits' has no captions" in err
    assert not (tmp_path / "c").exists()


def test_retrieval_counts_exact_and_consistent_hits():
    # 100 texts and images; text i points at image i, except text 0 points at image 1, which it also describes
    emb = torch.eye(100)
    txt = emb.clone()
    txt[0] = emb[1]
    describes = torch.eye(100, dtype=torch.bool)
    describes[0, 1] = True
    r = _retrieval(txt, emb, describes)
    assert r["exact"] == 0.99 and r["consistent"] == 1.0
    assert r["exact_chance"] == 0.01 and r["consistent_chance"] == pytest.approx(101 / 100 / 100)
