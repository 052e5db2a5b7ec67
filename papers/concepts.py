"""The personalisation papers' concepts and judge (papers/textual_inversion, papers/dreambooth).

Two concepts from the shapes generator, each new to the zoo's shapes-text-unet in its own way:
  red_star     a red star: the base's training captions held the pair out, so no caption taught it,
               but both words are known and a caption ("a red star") describes it;
  two_colour   a star red on its left half and blue on its right: no training image shows a
               two-colour object, and no caption names one.
The user's images and the held-out images come from different seeds.

The judge scores samples against held-out images of a concept: the shapes attribute classifier
(shape, colour; the concept "red star" is shape = star and colour = red), the two-colour score
(difflab.data.shapes.two_colour_score), and DreamBooth's scores (difflab.metrics.subject): SIM, the
mean cosine similarity to the held-out images under the classifier's penultimate features (standing in
for the paper's DINO features), CLIP-I, the same under the shipped image-text model's image tower, DIV,
the mean pairwise feature distance among samples, and the Gini-Simpson diversity of predicted colours.
"""

from __future__ import annotations

import torch

from difflab.assets import asset
from difflab.data.shapes import COLORS, SHAPES, make_shapes, make_two_colour, two_colour_score
from difflab.metrics.classifiers import load_classifier, prepare_images
from difflab.metrics.subject import gini_simpson, pairwise_distance, subject_similarity
from difflab.train.clip import load_clip

__all__ = ["CONCEPTS", "concept_images", "Judge"]

CONCEPTS = ("red_star", "two_colour")


def concept_images(n: int, seed: int, concept: str = "red_star") -> torch.Tensor:
    """n images of `concept` (N, 3, 32, 32) in [-1, 1]."""
    if concept == "red_star":
        exclude = [{"shape": s} for s in SHAPES if s != "star"] + [{"color": c} for c in COLORS if c != "red"]
        return make_shapes(n, seed=seed + 101, exclude=exclude)["images"]
    if concept == "two_colour":
        return make_two_colour(n, seed=seed + 101, shape="star", colors=("red", "blue"))
    raise ValueError(f"unknown concept {concept!r}; known: {CONCEPTS}")


class Judge:
    """Scores of samples against held-out images of a concept (`reference`)."""

    def __init__(self, reference: torch.Tensor):
        self.clf = load_classifier("shapes")
        self.clip = load_clip(asset("clip", "shapes"))
        self.ref, self.ref_clip = self._classify(reference)[1], self._clip(reference)

    @torch.no_grad()
    def _classify(self, x: torch.Tensor):
        return self.clf.logits_and_features(prepare_images(x, self.clf.config.in_channels, self.clf.config.image_size))

    @torch.no_grad()
    def _clip(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(x).float()

    def __call__(self, x: torch.Tensor, boot: int = 200, seed: int = 0) -> dict:
        """Rates ("subject" = red star, "star", "red", "split" = the two-colour concept in its order,
        "two_colours"), SIM and CLIP-I with their standard errors over samples, DIV and colour diversity
        with bootstrap standard errors (`boot` resamples), and the predicted colour counts."""
        logits, f = self._classify(x)
        shape, color = logits["shape"].argmax(1), logits["color"].argmax(1)
        is_star, is_red = shape == SHAPES.index("star"), color == COLORS.index("red")
        two = two_colour_score(x)
        sim, clip_sim = subject_similarity(f, self.ref), subject_similarity(self._clip(x), self.ref_clip)
        out = {
            "n": len(x),
            "subject": _mean(is_star & is_red),
            "star": _mean(is_star),
            "red": _mean(is_red),
            "split": _mean(two["split"]),
            "two_colours": _mean(two["two_colours"]),
            "sim": float(sim.mean()),
            "sim_se": float(sim.std() / len(x) ** 0.5),
            "clip_sim": float(clip_sim.mean()),
            "clip_sim_se": float(clip_sim.std() / len(x) ** 0.5),
            "colors": torch.bincount(color, minlength=len(COLORS)).tolist(),
        }
        g = torch.Generator().manual_seed(seed)
        stats = {"div": [], "color_div": []}
        for b in range(boot + 1):  # b = 0: the samples themselves; then bootstrap resamples for the SE
            idx = torch.arange(len(x)) if b == 0 else torch.randint(len(x), (len(x),), generator=g)
            stats["div"].append(pairwise_distance(f[idx]))
            stats["color_div"].append(gini_simpson(color[idx], len(COLORS)))
        for k, v in stats.items():
            v = torch.tensor(v)
            out[k], out[f"{k}_se"] = float(v[0]), float(v[1:].std()) if boot > 1 else 0.0
        return out


def _mean(b: torch.Tensor) -> float:
    return float(b.float().mean())
