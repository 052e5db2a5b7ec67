"""CLIP score (Hessel et al. 2021) with a Hugging Face transformers CLIP the user has on disk, by
torchmetrics' convention: images quantised to uint8 and prepared by the model's own CLIPProcessor
(resize, centre crop, normalise), prompts tokenised by it (cut at the text model's length),

    CLIP score = max(mean_i 100 * cos(E_image_i, E_text_i), 0).

    model, processor = load_hf_clip("clip-vit-base-patch32/")          # a local folder
    s = clip_score(images, prompts, model, processor)                    # images (N, C, H, W) in [-1, 1]
    difflab eval --run runs/ldm --clip-model clip-vit-base-patch32/     # adds it to the eval report

`tests/metrics/test_clip_score.py` checks it against torchmetrics' CLIPScore and against the
cosine inside CLIPModel.forward (logits_per_image / logit_scale) on a tiny random CLIP.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from difflab.metrics.standard import to_uint8
from difflab.nn.clip import clip_embeds

__all__ = ["load_hf_clip", "clip_score"]


def load_hf_clip(folder: str | os.PathLike, device: str | torch.device | None = None) -> tuple:
    """(CLIPModel, CLIPProcessor) of a local transformers folder (safetensors weights only)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"CLIP folder {folder} has no config.json (a transformers CLIPModel folder)")
    if not list(folder.glob("*.safetensors")):
        raise ValueError(f"{folder} holds no *.safetensors weights (difflab loads no pickle weights)")
    try:
        from transformers import CLIPModel, CLIPProcessor
    except ImportError as e:
        raise ValueError(f"CLIP score needs transformers: {e}") from None
    try:
        model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval().requires_grad_(False)
        processor = CLIPProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load a CLIP model and processor from {folder}: {e}") from None
    if device is not None:
        from difflab.pipeline import resolve_device

        model.to(resolve_device(device))
    return model, processor


@torch.no_grad()
def clip_score(images: Tensor, prompts: list[str], model, processor, batch_size: int = 64) -> dict:
    """{"clip_score", "per_image" (N,), "n"} of images (N, 1|3, H, W) (uint8, or float in [-1, 1]) and
    one prompt each."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts (one per image)")
    device = next(model.parameters()).device
    limit = int(model.config.text_config.max_position_embeddings)
    scores = []
    for a in range(0, len(images), batch_size):
        x = to_uint8(images[a : a + batch_size]).cpu()
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        pixels = processor(images=list(x), return_tensors="pt")["pixel_values"].to(device)
        text = processor(
            text=prompts[a : a + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=limit
        )
        img = clip_embeds(model.get_image_features(pixels)).float()
        txt = clip_embeds(model.get_text_features(text["input_ids"].to(device), text["attention_mask"].to(device)))
        txt = txt.float()
        cos = (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
        scores.append(100 * cos.cpu())
    per_image = torch.cat(scores)
    return {"clip_score": max(float(per_image.mean()), 0.0), "per_image": per_image, "n": len(per_image)}
