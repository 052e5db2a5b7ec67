"""CLIP score with a user's transformers CLIP (difflab.metrics.clip_score) on a tiny random CLIP written
by the test: equal to torchmetrics' CLIPScore (through an adapter: torchmetrics 1.9 expects the tensor
that transformers 4's get_*_features returned) and to the cosine inside CLIPModel.forward."""

import importlib.util
import json
import sys
import types

import pytest
import torch

from difflab.metrics.clip_score import clip_score, load_hf_clip

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return tiny_clip_folder(tmp_path_factory.mktemp("clip"))


def tiny_clip_folder(root):
    """A random transformers CLIP (2-layer 32-d towers, 32 x 32 images, the test's own vocabulary)
    with its CLIPProcessor, saved as a local folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    root.mkdir(parents=True, exist_ok=True)

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4)
    text.update(num_hidden_layers=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config={**vision, "patch_size": 8}, projection_dim=16))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root / "clip")
    model.save_pretrained(root / "clip")
    return root / "clip"


def _data():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 24, 24, generator=g) * 2 - 1
    return images, ["a red cat", "a dog", "xyz", "blue sky", "a tree on a hill"]


def test_clip_score_equals_clipmodels_own_cosine(clip_folder):
    model, processor = load_hf_clip(clip_folder)
    images, prompts = _data()
    got = clip_score(images, prompts, model, processor, batch_size=2)
    x = ((images + 1) * 127.5).round().to(torch.uint8)
    inputs = processor(text=prompts, images=list(x), return_tensors="pt", padding=True)
    out = model(**inputs)
    cos = out.logits_per_image.diagonal() / model.logit_scale.exp()
    torch.testing.assert_close(got["per_image"], 100 * cos, rtol=1e-4, atol=1e-4)
    assert got["n"] == 5 and got["clip_score"] == pytest.approx(max(float(100 * cos.mean()), 0.0), abs=1e-4)


def test_clip_score_equals_torchmetrics(clip_folder):
    if "torch_fidelity" not in sys.modules and importlib.util.find_spec("torch_fidelity") is not None:
        spec = importlib.util.find_spec("torch_fidelity")  # its __init__ needs torchvision (see test_standard_fid)
        pkg = types.ModuleType("torch_fidelity")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = pkg
    pytest.importorskip("torchmetrics")
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor = load_hf_clip(clip_folder)

    class Adapter(torch.nn.Module):  # transformers 5 returns ModelOutputs; torchmetrics 1.9 wants tensors
        def __init__(self):
            super().__init__()
            self.m, self.config = model, model.config

        def get_image_features(self, *a, **k):
            return model.get_image_features(*a, **k).pooler_output

        def get_text_features(self, *a, **k):
            return model.get_text_features(*a, **k).pooler_output

    images, prompts = _data()
    ref = CLIPScore(model_name_or_path=lambda: (Adapter(), processor))
    ref.update(((images + 1) * 127.5).round().to(torch.uint8), prompts)
    got = clip_score(images, prompts, model, processor)["clip_score"]
    assert got == pytest.approx(float(ref.compute()), rel=1e-4, abs=1e-4)


def test_bad_clip_input_is_named(clip_folder, tmp_path):
    model, processor = load_hf_clip(clip_folder)
    with pytest.raises(ValueError, match="5 images but 2 prompts"):
        clip_score(_data()[0], ["a", "b"], model, processor)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_hf_clip(tmp_path)


def test_eval_adds_the_clip_score_of_a_class_run(clip_folder):
    from difflab.metrics.evaluate import evaluate_run, format_report
    from difflab.zoo import ZOO_DIR

    # the default statistics cache, which the zoo checks fill with the same Fashion-MNIST statistics
    kw = dict(sampler="euler", steps=2, n=6, bpd="none", progress=False, log=lambda s: None)
    r = evaluate_run(ZOO_DIR / "fmnist-unet-s", clip_model=clip_folder, **kw)
    assert r["clip"]["prompts"] == "a photo of a T-shirt/top" and 0 <= r["clip_score"] <= 100
    assert "CLIP score" in format_report(r)
    with pytest.raises(ValueError, match="--clip-model needs prompts"):
        evaluate_run(ZOO_DIR / "digits-unet-s", clip_model=clip_folder, **kw)
