"""A run folder is untrusted input: its config.json cannot name a model to download, a file
outside the package, an arbitrary class, or a network too large to allocate."""

import json
import resource
import shutil

import pytest

from difflab.cli import main
from difflab.pipeline import Pipeline


@pytest.fixture
def run(tiny_run, tmp_path):
    return shutil.copytree(tiny_run, tmp_path / "run")


def _edit_config(run, change):
    config = json.loads((run / "config.json").read_text())
    change(config)
    (run / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "spec, match",
    [
        (
            {"kind": "minilm", "path": "sentence-transformers/all-MiniLM-L6-v2"},
            r"field\(s\) \['path'\] are not allowed",
        ),
        ({"kind": "minilm", "max_length": 77, "revision": "main"}, r"\['revision'\] are not allowed"),
        ({"kind": "hf", "name": "bert-base-uncased"}, "kind 'hf'; known: minilm, word"),
        (
            {"kind": "word", "vocab": ["a", "b"], "dim": 10**9},
            r"text_encoder \(word\).dim = 1000000000 is out of range",
        ),
        ("minilm", r"section\(s\) \['text_encoder'\] must be JSON objects"),
    ],
)
def test_a_text_encoder_section_cannot_reach_the_network(run, spec, match, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the config alone must not be able to download
    _edit_config(run, lambda c: c.update(text_encoder=spec))
    with pytest.raises(ValueError, match=match):
        Pipeline.from_pretrained(run)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: c["model"].update(channels=10**7), r"UNetConfig.channels = 10000000 is out of range"),
        (lambda c: c["model"].update(channel_mult=[1] * 1000), r"channel_mult has 1000 entries"),
        (lambda c: c["model"].update(channels=4096, num_res_blocks=64), r"describes [\d,]+ parameters, more than"),
        (lambda c: c["model"].update(arch="os.system"), r"arch 'os.system'; expected one of"),
        (lambda c: c["data"].update(size=10**6), r"integers in 1 \.\. 4096"),
    ],
)
def test_model_sizes_are_bounded_before_allocation(run, change, match):
    _edit_config(run, change)
    # the address space is capped at 3 GiB above what the process holds: a real build would fail
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        held = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (held + (3 << 30), hard))
    try:
        with pytest.raises(ValueError, match=match):
            Pipeline.from_pretrained(run)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_the_cli_says_so_in_one_line(run, tmp_path, capsys):
    _edit_config(run, lambda c: c.update(text_encoder={"kind": "minilm", "path": "evil/model"}))
    assert main(["sample", "--run", str(run), "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a run folder cannot name its own encoder files or hub ids" in err[0]
