"""bench/gpu_text_states.py: MiniLM token states exported here serve a training run elsewhere."""

import importlib.util
from pathlib import Path

import pytest
import torch

from difflab.train import conditioning
from difflab.train.conditioning import CaptionTable

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_text_states", ROOT / "bench" / "gpu_text_states.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stored_states_give_the_caption_table_of_the_real_encoder(tmp_path, monkeypatch):
    mod = _module()
    captions = [
        "a small red circle on the left",
        "a large blue square at the top against a dark background",
        "a small red circle on the left",
        "a green star in the center",
    ]
    path = tmp_path / "states.safetensors"
    info = mod.export(sorted(set(captions)), path)
    assert info["prompts"] == 4  # three distinct captions + the empty prompt
    real = CaptionTable(conditioning._frozen_minilm(77), captions)
    stored = mod.StoredMiniLM(path)
    assert stored.config_dict() == conditioning._frozen_minilm(77).config_dict()
    table = CaptionTable(stored, captions)
    assert torch.equal(table.mask, real.mask) and torch.equal(table.rows, real.rows)
    m = real.mask[..., None]
    torch.testing.assert_close(table.values * m, real.values * m, rtol=2e-3, atol=2e-3)  # fp16 storage
    with pytest.raises(KeyError, match="no stored states"):
        stored(["a purple cross at the bottom"])
    monkeypatch.setattr(conditioning, "_frozen_minilm", conditioning._frozen_minilm)  # restored after the test
    mod.use_stored(path)
    assert conditioning.build_text_encoder("minilm", captions, {}) is not None
    with pytest.raises(ValueError, match="max_length"):
        conditioning.build_text_encoder("minilm", captions, {"max_length": 32})
