"""`difflab edit METHOD`: every method end to end on a tiny run, the properties that survive PNG
files, and clear errors for bad files and arguments.

The run is tests/train/conftest.py's `tiny_run`: unet-xs on 16x16 grey digits, class-conditional
with label dropout (so "" is the unconditional model). Commands run in-process through
`difflab.cli.main` (a subprocess costs ~2 s of imports); one test runs the real `python -m difflab`.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.data import load_dataset, save_image_grid
from difflab.data.images import grid_size
from difflab.edit import edit, load_edit_image, load_edit_mask, save_clip
from difflab.nn.clip import SmallCLIP, SmallCLIPConfig
from difflab.pipeline import Pipeline
from tests.train.helpers import difflab_cli

SIZE = 16


def _png(x: torch.Tensor, path):
    save_image_grid(x, path, nrow=1, padding=0)  # one image, exactly its pixels
    return path


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("edit")
    image = load_dataset("digits", "test").images[:1]  # (1, 1, 16, 16)
    half = torch.zeros(1, 1, SIZE, SIZE)
    half[..., :, : SIZE // 2] = 1  # white left half
    torch.manual_seed(0)
    clip = SmallCLIP(
        SmallCLIPConfig(
            vocab=["a", "digit", "three"],
            in_channels=1,
            image_size=SIZE,
            channels=8,
            dim=16,
            text_dim=16,
            text_depth=1,
            noise_aware=False,
        )
    )
    return {
        "image": _png(image, d / "in.png"),
        "mask": _png(half * 2 - 1, d / "mask.png"),
        "clip": save_clip(clip, d / "clip"),
        "dir": d,
    }


def _edit(run, files, method, *args, out="out.png"):
    out = files["dir"] / f"{method}_{out}"
    rc = main(
        [
            "edit",
            method,
            "--run",
            str(run),
            "--image",
            str(files["image"]),
            "--out",
            str(out),
            "--steps",
            "4",
            "--no-progress",
            *args,
        ]
    )
    return rc, out


METHOD_ARGS = {
    "sdedit": ["--mask", "MASK", "--strength", "0.6", "--prompt", "3"],
    "ilvr": ["--factor", "4", "--stop", "0.25"],
    "repaint": ["--mask", "MASK", "--jump-length", "2", "--jump-n-sample", "2"],
    "blended": ["--mask", "MASK", "--prompt", "a digit three", "--clip", "CLIP", "--n-aug", "2", "--candidates", "2"],
    "diffedit": ["--prompt", "3", "--source-prompt", "", "--n-draws", "2"],
    "p2p": ["--prompt", "3", "--source-prompt", "5", "--self-replace", "0.5"],
}
TILES = {"sdedit": 3, "ilvr": 2, "repaint": 3, "blended": 4, "diffedit": 3, "p2p": 3}
KEEPS = {"sdedit": "black", "repaint": "white", "blended": "black"}  # the mask colour kept exactly


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_each_method_writes_the_output_and_the_strip(tiny_run, files, method, capsys):
    args = [str(files[a.lower()]) if a in ("MASK", "CLIP") else a for a in METHOD_ARGS[method]]
    rc, out = _edit(tiny_run, files, method, *args)
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    strip = out.with_name(out.stem + "_strip.png")
    assert f"wrote {out}" in printed.out and str(strip) in printed.out
    result, source = _pixels(out), _pixels(files["image"])
    assert result.shape == (SIZE, SIZE)  # the output alone, at the model's resolution (grey)
    width, _ = grid_size(TILES[method], SIZE, SIZE, nrow=TILES[method], scale=4)
    assert Image.open(strip).size[0] == width  # input | (mask) | (source/candidates) | output, captioned
    assert (result != source).any()
    if method in KEEPS:
        white = _pixels(files["mask"]) > 127
        kept = white if KEEPS[method] == "white" else ~white
        assert (
            f"{method} mask: white = keep" if KEEPS[method] == "white" else f"{method} mask: white = edit, black = keep"
        ) in printed.out
        np.testing.assert_array_equal(result[kept], source[kept])  # the kept region, pixel for pixel
        assert (result[~kept] != source[~kept]).any()


def test_python_m_difflab_edit_repaint_end_to_end(tiny_run, files, tmp_path):
    out = tmp_path / "r.png"
    proc = difflab_cli(
        "edit",
        "repaint",
        "--run",
        str(tiny_run),
        "--image",
        str(files["image"]),
        "--mask",
        str(files["mask"]),
        "--invert-mask",
        "--out",
        str(out),
        "--steps",
        "3",
        "--jump-length",
        "1",
        "--jump-n-sample",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    assert "repaint mask: white = keep (known pixels), black = repaint (--invert-mask" in proc.stdout
    kept = _pixels(files["mask"]) <= 127  # inverted: the black half of the file is kept
    np.testing.assert_array_equal(_pixels(out)[kept], _pixels(files["image"])[kept])
    assert (tmp_path / "r_strip.png").is_file()


def test_edit_help_documents_the_mask_convention(capsys):
    with pytest.raises(SystemExit) as e:
        main(["edit", "repaint", "--help"])
    assert e.value.code == 0
    assert "white = keep (known pixels), black = repaint" in capsys.readouterr().out


@pytest.fixture(scope="module")
def pipe(tiny_run):
    return Pipeline.from_pretrained(tiny_run)


def _image(pipe):
    return load_dataset("digits", "test").images[1:2]


def test_diffedit_keeps_the_input_outside_its_automatic_mask(pipe):
    image = _image(pipe)
    result = edit(pipe, "diffedit", image, prompt="3", source_prompt="", steps=4, n_draws=2)
    captions = [c for c, _ in result.tiles]
    assert captions[:2] == ["input", "mask (automatic): white = edit"] and captions[-1] == "output"
    mask = (result.tiles[1][1][:, :1] > 0).float()  # white = edit
    assert 0 < mask.mean() < 1
    torch.testing.assert_close(result.output * (1 - mask), image * (1 - mask), rtol=0, atol=0)


def test_p2p_with_the_same_prompt_twice_regenerates_the_source(pipe):
    result = edit(pipe, "p2p", _image(pipe), prompt="7", source_prompt="7", steps=4, cross_replace=0.5)
    source = dict(result.tiles)["source (inverted and regenerated)"]
    torch.testing.assert_close(result.output, source, rtol=1e-5, atol=1e-5)
    other = edit(pipe, "p2p", _image(pipe), prompt="1", source_prompt="7", steps=4, cross_replace=0.5)
    torch.testing.assert_close(dict(other.tiles)["source (inverted and regenerated)"], source, rtol=1e-5, atol=1e-5)
    assert (other.output - source).abs().max() > 1e-3


def test_text_run_diffedit_and_p2p_refine(files, tmp_path_factory, capsys):
    from difflab.train import train
    from tests.train.helpers import tiny_config

    cfg = tiny_config(
        steps=2,
        data="shapes",
        data_kwargs={"n": 32, "size": SIZE},
        conditioning="text",
        text_encoder="word",
        text_encoder_kwargs={"dim": 16, "depth": 1},
        model_overrides={"channels": 16},
    )
    run = train(cfg, tmp_path_factory.mktemp("text") / "run", progress=False)
    image = _png(load_dataset("shapes", "test", n=1, size=SIZE).images, files["dir"] / "shape.png")
    out = files["dir"] / "text.png"
    common = ["--run", str(run), "--image", str(image), "--out", str(out), "--steps", "4", "--no-progress"]
    assert (
        main(
            [
                "edit",
                "diffedit",
                *common,
                "--prompt",
                "a red circle",
                "--source-prompt",
                "a blue square",
                "--n-draws",
                "2",
                "--guidance-scale",
                "3",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "edit",
                "p2p",
                *common,
                "--prompt",
                "a large red circle",
                "--source-prompt",
                "a red circle",
                "--edit",
                "refine",
            ]
        )
        == 0
    )
    assert "no cross-attention" not in capsys.readouterr().out
    assert (
        main(
            [
                "edit",
                "p2p",
                *common,
                "--prompt",
                "a red circle",
                "--source-prompt",
                "a red circle",
                "--edit",
                "reweight",
                "--reweight-token",
                "9",
            ]
        )
        == 2
    )
    assert "--reweight-token in 0..2" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_file_errors_name_the_file_and_the_value(files, tmp_path):
    small = _png(torch.zeros(1, 1, 8, 8), tmp_path / "small.png")
    with pytest.raises(ValueError, match=r"mask .*small.png is 8x8; the image is 16x16"):
        load_edit_mask(small, SIZE)
    grey = torch.full((1, 1, SIZE, SIZE), -1.0)
    grey[..., 3, 5] = 0.0  # grey value 128
    with pytest.raises(ValueError, match=r"not binary: pixel \(row 3, col 5\) has grey value 128"):
        load_edit_mask(_png(grey, tmp_path / "grey.png"), SIZE)
    with pytest.raises(ValueError, match=r"image .*small.png is 8x8; the model takes 16x16 .*--resize"):
        load_edit_image(small, 1, SIZE)
    assert load_edit_image(small, 1, SIZE, resize=True).shape == (1, 1, SIZE, SIZE)
    rgb = _png(torch.zeros(1, 3, SIZE, SIZE), tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"has 3 channel\(s\) \(RGB\); the model takes 1 \(grey\)"):
        load_edit_image(rgb, 1, SIZE)
    with pytest.raises(FileNotFoundError, match="image file not found: .*nowhere.png"):
        load_edit_image(tmp_path / "nowhere.png", 1, SIZE)
    with pytest.raises(FileNotFoundError, match="mask file not found: .*nowhere.png"):
        load_edit_mask(tmp_path / "nowhere.png", SIZE)


def test_argument_errors_name_the_value(pipe):
    image = _image(pipe)
    with pytest.raises(ValueError, match=r"diffedit needs --prompt"):
        edit(pipe, "diffedit", image)
    with pytest.raises(ValueError, match=r"p2p needs --source-prompt"):
        edit(pipe, "p2p", image, prompt="3")
    with pytest.raises(ValueError, match=r"blended needs --prompt"):
        edit(pipe, "blended", image, mask=torch.ones(1, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"repaint needs a mask \(repaint mask: white = keep"):
        edit(pipe, "repaint", image)
    with pytest.raises(ValueError, match=r"--prompt 'cat' names no class of this run; known: '0', '1'"):
        edit(pipe, "sdedit", image, prompt="cat")
    with pytest.raises(ValueError, match=r"mask must be binary \(0/1\); found value 0.5"):
        edit(pipe, "repaint", image, mask=torch.full((1, 1, SIZE, SIZE), 0.5))
    with pytest.raises(ValueError, match=r"mask of shape \(1, 1, 8, 8\) does not fit the image"):
        edit(pipe, "repaint", image, mask=torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"image of shape \(3, 16, 16\) does not fit the model, which takes \(1, 16"):
        edit(pipe, "sdedit", torch.zeros(1, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"sdedit strength must be a finite number in \(0, 1\], got 1.5"):
        edit(pipe, "sdedit", image, strength=1.5)
    with pytest.raises(ValueError, match=r"p2p --edit refine .* needs a text-conditional model"):
        edit(pipe, "p2p", image, prompt="1", source_prompt="2", edit="refine")
    with pytest.raises(ValueError, match=r"repaint runs its own sampler"):
        edit(pipe, "repaint", image, mask=torch.ones(1, 1, SIZE, SIZE), sampler="euler")


def test_cli_errors_are_one_line_with_status_2(tiny_run, files, capsys):
    rc, out = _edit(tiny_run, files, "sdedit", "--mask", str(files["dir"] / "missing.png"), out="err.png")
    assert rc == 2 and not out.exists()
    assert capsys.readouterr().err.startswith("difflab edit: error: mask file not found: ")
    rc, _ = _edit(tiny_run, files, "diffedit", "--prompt", "3", "--source-prompt", "3")
    assert rc == 2 and "are the same condition" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: a required flag
        _edit(tiny_run, files, "p2p", "--prompt", "3")
    assert e.value.code == 2 and "--source-prompt" in capsys.readouterr().err
