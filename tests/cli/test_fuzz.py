"""Property-based: random argument values, random or corrupt config.json, safetensors headers and
images thrown at the CLI and `Pipeline.from_pretrained`. Every outcome is exit 0 with finite
output, or one error line with exit 2 -- never a traceback. Derandomized: CI sees the same cases."""

import json
import shutil

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from difflab.cli import main
from difflab.pipeline import Pipeline

SETTINGS = settings(
    max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", 40)),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _outcome(capsys, argv):
    """(code, stderr lines) of one CLI call; a traceback or another exit code fails the test."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse: usage line + one error line, exit 2
        code = e.code
    out, err = capsys.readouterr()
    lines = [ln.strip() for ln in err.replace("\r", "\n").splitlines() if ln.strip()]  # progress bars use \r
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    if code == 2:  # one error line, the last (argparse puts its usage line before it)
        errors = [ln for ln in lines if "error:" in ln]
        assert len(errors) == 1 and lines[-1] == errors[0], lines
    return code, lines


def _number_text():
    return st.one_of(
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.integers(-(10**20), 10**20).map(str),
        st.sampled_from(["", "1e999", "-0", "0x10", "nan", "inf", "1_000", " 3", "2.5"]),
        st.text(max_size=4),
    )


@SETTINGS
@given(
    steps=st.one_of(st.integers(-2, 4).map(str), _number_text()),
    n=st.one_of(st.integers(-2, 4).map(str), _number_text()),
    scale=_number_text(),
    rescale=_number_text(),
    seed=_number_text(),
    label=st.one_of(st.integers(-3, 12).map(str), _number_text()),
)
def test_sample_with_random_numbers(tiny_run, tmp_path_factory, capsys, steps, n, scale, rescale, seed, label):
    out = tmp_path_factory.mktemp("s") / "g.png"
    # keep valid budgets small: an n of 10^20 is refused by nothing but patience
    if n.strip().lstrip("+").isdigit() and int(n) > 6 or steps.strip().lstrip("+").isdigit() and int(steps) > 6:
        return
    code, _ = _outcome(
        capsys,
        [
            "sample",
            "--run",
            tiny_run,
            f"--steps={steps}",
            f"--n={n}",
            f"--guidance-scale={scale}",
            f"--guidance-rescale={rescale}",
            f"--seed={seed}",
            f"--label={label}",
            "--out",
            out,
        ],
    )
    if code == 0:
        assert out.stat().st_size > 0


_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@SETTINGS
@given(data=st.data())
def test_from_pretrained_with_a_corrupt_config(tiny_run, tmp_path_factory, data):
    run = shutil.copytree(tiny_run, tmp_path_factory.mktemp("c") / "run")
    config = json.loads((run / "config.json").read_text())
    # replace one value somewhere in the config by random JSON (or delete it)
    path, node = [], config
    while isinstance(node, dict) and node and data.draw(st.booleans(), label="deeper"):
        key = data.draw(st.sampled_from(sorted(node)), label="key")
        path.append(key)
        parent, node = node, node[key]
    if not path:
        key = data.draw(st.sampled_from(sorted(config)), label="key")
        parent, path = config, [key]
    if data.draw(st.booleans(), label="delete"):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(_json, label="value")
    (run / "config.json").write_text(json.dumps(config))
    try:
        pipe = Pipeline.from_pretrained(run)
        x = pipe(2, steps=2)
    except (ValueError, FileNotFoundError) as e:  # the two errors the CLI turns into one line
        assert str(e) and "Traceback" not in str(e)  # any other exception type fails the test
        return
    assert torch.isfinite(x).all() and x.shape[0] == 2


@SETTINGS
@given(where=st.integers(0, 400), value=st.integers(0, 255), cut=st.one_of(st.none(), st.integers(0, 2000)))
def test_from_pretrained_with_a_corrupt_safetensors_header(tiny_run, tmp_path_factory, where, value, cut):
    run = shutil.copytree(tiny_run, tmp_path_factory.mktemp("h") / "run")
    blob = bytearray((run / "model.safetensors").read_bytes())
    blob[where] = value
    if cut is not None:
        blob = blob[:cut]
    (run / "model.safetensors").write_bytes(bytes(blob))
    try:
        x = Pipeline.from_pretrained(run)(2, steps=2)
    except ValueError as e:
        assert str(e)
        return
    assert torch.isfinite(x).all()


@SETTINGS
@given(
    w=st.integers(1, 64),
    h=st.integers(1, 64),
    mode=st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "I", "F"]),
    fmt=st.sampled_from(["PNG", "BMP", "TIFF", "garbage", "truncated"]),
    resize=st.booleans(),
)
def test_edit_with_random_images(tiny_run, tmp_path_factory, capsys, w, h, mode, fmt, resize):
    folder = tmp_path_factory.mktemp("i")
    image = folder / "in.png"
    if fmt == "garbage":
        image.write_bytes(bytes(range(256)) * 3)
    else:
        try:
            Image.new(mode, (w, h)).save(image, format="PNG" if fmt == "truncated" else fmt)
        except OSError:  # a mode that format cannot hold: TIFF holds them all
            Image.new(mode, (w, h)).save(image, format="TIFF")
        if fmt == "truncated":
            image.write_bytes(image.read_bytes()[: max(8, image.stat().st_size // 2)])
    argv = ["edit", "sdedit", "--run", tiny_run, "--image", image, "--out", folder / "o.png", "--steps", 2]
    code, _ = _outcome(capsys, argv + (["--resize"] if resize else []))
    if code == 0:
        import numpy as np

        assert np.asarray(Image.open(folder / "o.png")).size > 0


def test_finite_but_huge_guidance_is_an_error_not_a_black_grid(tiny_run, tmp_path, capsys):
    code, lines = _outcome(
        capsys,
        ["sample", "--run", tiny_run, "--n", 2, "--steps", 3, "--guidance-scale", "1e308", "--out", tmp_path / "g.png"],
    )
    assert code == 2 and "NaN/inf" in lines[-1] and not (tmp_path / "g.png").exists()
