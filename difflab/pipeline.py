"""A trained model as one object: load a run folder, sample images, save it elsewhere.

    pipe = Pipeline.from_pretrained("runs/fmnist")
    images = pipe(16, class_labels=3, guidance_scale=2.0, sampler="dpmpp_2m", steps=20, seed=0)
    pipe.save_pretrained("my_model")         # config.json + model.safetensors

`guidance_scale` is the library convention s of classifier-free guidance (s = 1: no guidance;
the paper's w is s - 1); it needs a class-conditional model trained with label dropout.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from difflab.core import cfg as cfg_guidance
from difflab.core import sample, sigmas_karras
from difflab.core.sampling import DEFAULT_SAMPLER, SAMPLERS
from difflab.core.schedules import DiscreteVP, sigmas_spaced
from difflab.train.checkpoint import CHECKPOINT_FORMAT, atomic_save_safetensors, write_json
from difflab.train.loop import load_run

__all__ = ["Pipeline", "grid_for"]


def grid_for(schedule, steps: int) -> Tensor:
    """The sigma grid difflab uses for `steps` steps of a schedule."""
    try:
        from difflab.core.sampling import default_sigmas  # the benchmarked recipe, when present
    except ImportError:
        default_sigmas = None
    if default_sigmas is not None:
        return default_sigmas(schedule, steps)
    if isinstance(schedule, DiscreteVP):
        return sigmas_spaced(schedule, steps, "trailing")
    return sigmas_karras(steps, schedule.sigma_min, schedule.sigma_max)


class Pipeline:
    """A denoiser plus its run config; `__call__` samples images in [-1, 1]."""

    def __init__(self, denoiser, config: dict):
        self.denoiser = denoiser
        self.config = config

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, weights: str = "ema") -> "Pipeline":
        denoiser, config = load_run(path, weights=weights)
        return cls(denoiser, config)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(self.denoiser.net.state_dict(), path / "model.safetensors",
                                metadata={"format": CHECKPOINT_FORMAT})
        write_json(path / "config.json", self.config)
        return path

    @property
    def num_classes(self) -> int | None:
        return self.config["model"].get("num_classes")

    @property
    def class_names(self) -> list[str]:
        return self.config.get("data", {}).get("class_names", [])

    def image_shape(self) -> tuple[int, int, int]:
        d = self.config["data"]
        return (d["channels"], d["size"], d["size"])

    def _labels(self, n: int, class_labels) -> Tensor | None:
        k = self.num_classes
        if class_labels is None:
            return None if k is None else torch.arange(n) % k
        if k is None:
            raise ValueError("class_labels given, but this model is unconditional")
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(n)
        if labels.numel() != n:
            raise ValueError(f"class_labels has {labels.numel()} entries for n={n} images")
        bad = labels[(labels < 0) | (labels >= k)]
        if bad.numel():
            raise ValueError(f"class label {bad[0].item()} out of range [0, {k}) for this model")
        return labels.clone()

    @torch.no_grad()
    def __call__(self, n: int = 16, *, class_labels=None, guidance_scale: float = 1.0,
                 sampler: str = DEFAULT_SAMPLER, steps: int = 20, seed: int = 0,
                 batch_size: int = 256, progress: bool = False, sigmas: Tensor | None = None,
                 **sampler_kw) -> Tensor:
        """Generate n images (n, C, H, W) in [-1, 1]."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(sorted(SAMPLERS))}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        labels = self._labels(n, class_labels)
        D = self.denoiser
        if guidance_scale != 1.0:
            if labels is None:
                raise ValueError("guidance_scale needs a class-conditional model")
            D = cfg_guidance(guidance_scale, {"class_labels": torch.tensor([-1])})(D)
        sig = grid_for(self.denoiser.schedule, steps) if sigmas is None else sigmas
        device = next(self.denoiser.parameters()).device
        g = torch.Generator().manual_seed(seed)
        noise_g = torch.Generator().manual_seed(seed + 1)
        out = []
        chunks = range(0, n, batch_size)
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc=f"sample {sampler}", leave=False)
        for a in chunks:
            b = min(n, a + batch_size)
            x = torch.randn((b - a, *self.image_shape()), generator=g).to(device) * float(sig[0])
            cond = {} if labels is None else {"class_labels": labels[a:b].to(device)}
            out.append(sample(D, x, sig, method=sampler, cond=cond, noise=noise_g, **sampler_kw).cpu())
        return torch.cat(out).clamp(-1, 1)
