"""Operating-system failures and hostile files: one line naming the path and the cause, exit 2,
checked before the work where the path is known up front, and nothing already written lost.

Read-only and full disks are real: a tmpfs mounted read-only or 64 KiB small where this machine
allows mounting (root), else a read-only permission (non-root) or a file-size limit (ulimit -f)."""

import os
import subprocess
import sys

import pytest
from PIL import Image

from difflab.cli import main
from tests.train.helpers import subprocess_env


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def _mount(path, options):
    """Mount a tmpfs at path; False where this machine does not allow it."""
    path.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    except OSError:
        return False
    return r.returncode == 0


@pytest.fixture
def read_only_dir(tmp_path):
    path = tmp_path / "ro"
    if _mount(path, "ro,size=64k"):
        yield path
        subprocess.run(["umount", str(path)])
    elif os.geteuid() != 0:
        os.chmod(path, 0o555)
        yield path
        os.chmod(path, 0o755)
    else:
        pytest.skip("root without mount: no way to make a read-only folder here")


@pytest.fixture
def full_disk(tmp_path):
    path = tmp_path / "disk"
    if not _mount(path, "size=64k"):
        pytest.skip("cannot mount a small tmpfs here (the ulimit test covers a full disk)")
    yield path
    subprocess.run(["umount", str(path)])


def test_unknown_extension_and_folder_outputs_are_refused_before_any_work(capsys, tmp_path):
    # the run does not exist: an error about --out proves the check came first
    code, _, err = _run(capsys, "sample", "--run", tmp_path / "no-run", "--out", tmp_path / "grid.xyz")
    assert code == 2 and len(err) == 1 and "unknown file type '.xyz'" in err[0] and ".png" in err[0]
    (tmp_path / "adir.png").mkdir()
    code, _, err = _run(capsys, "sample", "--run", tmp_path / "no-run", "--out", tmp_path / "adir.png")
    assert code == 2 and len(err) == 1 and "adir.png is a folder" in err[0]
    (tmp_path / "afile").write_text("x")
    code, _, err = _run(capsys, "sample", "--run", tmp_path / "no-run", "--out", tmp_path / "afile" / "g.png")
    assert code == 2 and len(err) == 1 and "afile is a file, not a folder" in err[0]
    code, _, err = _run(capsys, "eval", "--run", tmp_path / "no-run", "--out", tmp_path / "report.txt")
    assert code == 2 and "unknown file type '.txt'" in err[0]


def test_the_file_type_follows_the_extension(tiny_run, tmp_path, capsys):
    for name, magic in (("g.jpg", b"\xff\xd8"), ("g.png", b"\x89PNG"), ("g.bmp", b"BM")):
        code, _, _ = _run(capsys, "sample", "--run", tiny_run, "--n", 2, "--steps", 2, "--out", tmp_path / name)
        assert code == 0 and (tmp_path / name).read_bytes()[: len(magic)] == magic


def test_read_only_output_folder(tiny_run, read_only_dir, capsys):
    code, out, err = _run(capsys, "sample", "--run", tiny_run, "--n", 2, "--steps", 2, "--out", read_only_dir / "g.png")
    assert code == 2 and len(err) == 1 and f"{read_only_dir} is not writable" in err[0] and "sample" not in out
    code, _, err = _run(
        capsys,
        "train",
        "--data",
        "digits",
        "--model",
        "unet-xs",
        "--steps",
        1,
        "--out",
        read_only_dir / "run",
        "--no-progress",
    )
    assert code == 2 and len(err) == 1 and "not writable" in err[0]


def test_a_full_disk_is_one_line_and_leaves_no_temp_files(full_disk, capsys):
    run = full_disk / "run"
    code, _, err = _run(
        capsys,
        "train",
        "--data",
        "digits",
        "--model",
        "unet-xs",
        "--steps",
        2,
        "--batch-size",
        8,
        "--out",
        run,
        "--no-progress",
    )
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0], err
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def test_a_file_size_limit_is_one_line(tmp_path):
    """ulimit -f: the same failure as a full disk, on any machine (Python ignores SIGXFSZ: EFBIG)."""
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536));"
        "from difflab.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "train",
            "--data",
            "digits",
            "--model",
            "unet-xs",
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "File too large" in err[0], r.stderr
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_a_decompression_bomb_is_refused_before_decoding(tiny_run, tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 M pixels in a file of some kilobytes
    assert bomb.stat().st_size < 200_000
    code, _, err = _run(
        capsys,
        "edit",
        "sdedit",
        "--run",
        tiny_run,
        "--image",
        bomb,
        "--out",
        tmp_path / "o.png",
        "--resize",
        "--steps",
        2,
    )
    assert code == 2 and len(err) == 1 and "more than 178,956,970 pixels, more than difflab reads" in err[0]
    Image.new("1", (5000, 5000)).save(bomb)  # under PIL's own limit, over difflab's
    code, _, err = _run(
        capsys,
        "edit",
        "sdedit",
        "--run",
        tiny_run,
        "--image",
        bomb,
        "--out",
        tmp_path / "o.png",
        "--resize",
        "--steps",
        2,
    )
    assert code == 2 and len(err) == 1 and "5000 x 5000 = 25,000,000 pixels, more than difflab reads" in err[0]


@pytest.mark.parametrize(
    "text, match",
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (
            '{"format": "difflab-checkpoint-1", "model": {}}',
            r"lacks the field\(s\) \['schedule', 'prediction', 'data'\]",
        ),
        ("", "not valid JSON"),
    ],
)
def test_hostile_configs_are_one_line(tiny_run, tmp_path, capsys, text, match):
    import re
    import shutil

    run = shutil.copytree(tiny_run, tmp_path / "run")
    (run / "config.json").write_text(text)
    code, _, err = _run(capsys, "sample", "--run", run, "--out", tmp_path / "g.png")
    assert code == 2 and len(err) == 1 and re.search(match, err[0]), err


def test_eval_prints_its_scores_before_a_write_that_fails(tiny_run, tmp_path, capsys, monkeypatch):
    import errno

    import difflab.metrics.evaluate as ev

    def disk_full(report, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ev, "write_report", disk_full)
    code, out, err = _run(
        capsys,
        "eval",
        "--run",
        tiny_run,
        "--n",
        20,
        "--steps",
        2,
        "--bpd",
        "none",
        "--out",
        tmp_path / "e.json",
        "--no-progress",
    )
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0]
    assert "FD" in out  # the scores reached the screen before the write
