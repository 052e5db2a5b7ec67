"""The training loop: one function you can read top to bottom.

    cfg = TrainConfig(data="fashion_mnist", model="unet-s", steps=2000, class_conditional=True)
    train(cfg, "runs/fmnist")                 # writes config.json, model.safetensors, checkpoint
    train(cfg, "runs/fmnist", resume=True)    # continues exactly where it stopped

Text-to-image and latent diffusion use the same loop (see train/conditioning.py):

    cfg = TrainConfig(data="shapes", conditioning="text", text_encoder="minilm", caption_dropout=0.1,
                      autoencoder="runs/ae")     # a folder from `difflab train-autoencoder`
    train(cfg, "runs/shapes_ldm")             # + runs/shapes_ldm/autoencoder, the copy sampling decodes with

Exact resume: every source of randomness in step s (the batch, sigma, noise, dropout, label and
caption dropout) is drawn from generators seeded by hash(seed, s), never from a stream that
depends on how many steps ran before; the optimizer, EMA and step counter are in the checkpoint. A run
killed (even by SIGKILL) and resumed ends with the same weights, bit for bit, as one that was
never interrupted.

Multi-process: under `torchrun --nproc_per_node N`, each rank takes 1/N of every micro-batch
(`[rank::N]`, with the noise and sigmas a single process would draw), DDP averages gradients
(gloo on CPU, NCCL on GPU, one GPU per rank), rank 0 writes the run folder and logs the global
batch's loss. The result equals one process's to float rounding, except that dropout inside the
network draws its masks per rank. The micro-batch (batch_size / grad_accum) must divide by N.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difflab.core.denoiser import Preconditioned
from difflab.core.losses import DenoisingLoss, discrete_uniform, lognormal
from difflab.core.schedules import EDM, DiscreteVP, schedule_from_config
from difflab.core.validation import MAX_LR, check_budget, check_number, check_training_state
from difflab.data import ImageData, batch_indices, load_dataset
from difflab.data._hash import seed_from
from difflab.nn import create_model, model_config
from difflab.nn.base import load_weights
from difflab.nn.lora import add_lora, has_lora, lora_state, load_lora_state
from difflab.nn.text import TEXT_ENCODERS
from difflab.models import AUTOENCODER_FOLDER, TRAINABLE_PREFIX
from difflab.train.conditioning import (
    CONDITIONINGS,
    CaptionTable,
    build_text_encoder,
    encode_latents,
    open_autoencoder,
)
from difflab.runfolder import (
    CHECKPOINT_FORMAT,
    atomic_save_safetensors,
    RunLock,
    atomic_write_bytes,
    check_new_folder,
    read_safetensors,
    remove_stale_temps,
    write_run_save,
)

__all__ = ["TrainConfig", "train", "load_training_data"]


FINETUNE = ("all", "lora", "embeddings")  # what a fine-tuning run trains (TrainConfig.finetune)


@dataclass
class TrainConfig:
    """Everything a run needs; saved in config.json beside the weights."""

    data: str = "fashion_mnist"
    model: str = "unet-s"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # what the network is conditioned on: "class" (labels), "text" (captions through cross-attention)
    # or "none"; None: from class_conditional, the older switch (True or None: "class", False: "none")
    conditioning: str | None = None
    class_conditional: bool | None = None
    label_dropout: float = 0.1  # classifier-free guidance: labels dropped to the null class
    # text: "minilm" (frozen pretrained MiniLM, token states + mask, cached per caption) or "word" (a
    # small encoder trained jointly); kwargs e.g. {"dim": 64, "depth": 1} for "word"
    text_encoder: str = "minilm"
    text_encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    caption_dropout: float = 0.1  # classifier-free guidance: captions dropped to the empty prompt ""
    # latent diffusion: an autoencoder folder (`difflab train-autoencoder`); the loop trains on its
    # scaled latents, copies it into the run folder, and the Pipeline decodes with it
    autoencoder: str | None = None
    # the denoiser: prediction + schedule (EDM preconditioning by default: best per CPU-minute)
    prediction: str = "edm"
    schedule: dict[str, Any] = field(default_factory=lambda: EDM().to_config())
    sigma_sampler: str = "lognormal"  # "lognormal" (EDM) or "discrete_uniform" (DDPM)
    p_mean: float = -1.2
    p_std: float = 1.2
    weighting: str = "simple"
    # L_hybrid's lambda (Nichol & Dhariwal 2021: 0.001) for a learned-variance network (learn_sigma=True,
    # a DiscreteVP schedule): the variance channels learn by the VLB; 0 leaves them untrained
    vlb_weight: float = 0.001
    sigma_data: float | None = None  # EDM's sigma_data; None: 0.5 for images in [-1, 1], 1.0 for latents
    # optimisation
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    bf16: bool = False
    # budget and bookkeeping
    steps: int | None = 2000
    minutes: float | None = None
    # what `minutes` counts: "wall" clock, or "cpu" time of this process (all its threads) -- a fair
    # budget on a shared machine, e.g. 20 CPU-minutes = 10 minutes of 2 cores
    clock: str = "wall"
    seed: int = 0
    save_every: int = 500
    log_every: int = 25
    flip: bool = False
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    # fine-tuning: start from a trained run instead of random weights (`init_from`: a difflab run
    # folder or zoo name). The base fixes the network, schedule, preconditioning, conditioning, text
    # encoder and autoencoder; `finetune` says what is trained: "all" = every weight of the denoiser,
    # "lora" = adapters only (the run folder then holds just them and names its base), "embeddings"
    # = Textual Inversion: one new `token`'s row of the text encoder's embedding table, nothing else;
    # what is not trained stays frozen (no gradients, no optimizer state)
    init_from: str | None = None
    finetune: str = "all"  # "lora": rank-`lora_rank` adapters on every attention projection, all else frozen
    lora_rank: int = 4
    lora_alpha: float | None = None  # None: = lora_rank (scale 1)
    token: str | None = None  # "embeddings" (Textual Inversion): the new pseudo-word, e.g. "<S*>"
    init_token: str | None = None  # the coarse word its embedding row starts from
    gradient_checkpointing: bool = False  # recompute each network stage in the backward pass (less memory)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def __post_init__(self) -> None:
        legacy = self.class_conditional
        if self.conditioning is None:
            self.conditioning = "none" if legacy is not None and not legacy else "class"
        elif legacy is not None and bool(legacy) != (self.conditioning == "class"):
            raise ValueError(
                f"class_conditional={legacy} contradicts conditioning={self.conditioning!r}; give conditioning alone"
            )

    def validate(self) -> None:
        check_budget(self.steps, self.minutes)
        check_number("lr", self.lr, lo=0, lo_open=True, hi=MAX_LR)
        for name, lo, lo_open, integer in (
            ("warmup", 0, False, True),
            ("weight_decay", 0, False, False),
            ("grad_clip", 0, False, False),
            ("p_mean", None, False, False),
            ("p_std", 0, True, False),
            ("seed", 0, False, True),
            ("save_every", 0, False, True),
            ("log_every", 1, False, True),
            ("ema_decay", 0, False, False),
            ("vlb_weight", 0, False, False),
        ):
            check_number(name, getattr(self, name), lo=lo, lo_open=lo_open, integer=integer)
        if self.sigma_data is not None:
            check_number("sigma_data", self.sigma_data, lo=0, lo_open=True)
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.clock not in ("wall", "cpu"):
            raise ValueError(f"clock must be 'wall' or 'cpu', got {self.clock!r}")
        if self.sigma_sampler not in ("lognormal", "discrete_uniform"):
            raise ValueError(f"sigma_sampler must be 'lognormal' or 'discrete_uniform', got {self.sigma_sampler!r}")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {', '.join(CONDITIONINGS)}, got {self.conditioning!r}")
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"unknown text_encoder {self.text_encoder!r}; known: {', '.join(TEXT_ENCODERS)}")
        for name in ("label_dropout", "caption_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.flip and self.conditioning == "text":
            raise ValueError("flip=True would contradict captions that name positions (left, right)")
        if self.flip and self.autoencoder:
            raise ValueError("flip=True is not supported with an autoencoder (the latents are encoded once)")
        if self.finetune not in FINETUNE:
            raise ValueError(f"finetune must be one of {', '.join(FINETUNE)}, got {self.finetune!r}")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise ValueError(f"lora_rank must be a positive integer, got {self.lora_rank!r}")
        if self.finetune == "embeddings" and not (self.token and self.init_token):
            raise ValueError("finetune='embeddings' (Textual Inversion) needs token (e.g. '<S*>') and init_token")
        if self.finetune != "all" and not self.init_from:
            raise ValueError(f"finetune={self.finetune!r} adapts a trained model: give init_from (--init-from RUN)")


# The papers' training objectives as TrainConfig fields (`difflab train --recipe NAME`): what is
# predicted, the noise schedule, how sigma is drawn, the loss. Optimisation (lr, batch, EMA) is the
# user's choice either way.
RECIPES: dict[str, dict[str, Any]] = {
    # Karras et al. 2022: EDM preconditioning, ln sigma ~ N(-1.2, 1.2^2) (difflab's default)
    "edm": {"prediction": "edm", "schedule": EDM().to_config(), "sigma_sampler": "lognormal", "weighting": "simple"},
    # Ho et al. 2020: eps prediction, linear betas 1e-4..0.02 over T = 1000, t ~ U{1..T}, L_simple
    "ddpm": {
        "prediction": "eps",
        "schedule": {"type": "DiscreteVP", "kind": "linear", "T": 1000, "quantize": False},
        "sigma_sampler": "discrete_uniform",
        "weighting": "simple",
    },
    # Nichol & Dhariwal 2021: cosine schedule, learned variances by L_hybrid (lambda 0.001)
    "iddpm": {
        "prediction": "eps",
        "schedule": {"type": "DiscreteVP", "kind": "cosine", "T": 1000, "quantize": False},
        "sigma_sampler": "discrete_uniform",
        "weighting": "simple",
        "vlb_weight": 0.001,
        "model_overrides": {"learn_sigma": True},
    },
}


def recipe_config(name: str, **changes) -> "TrainConfig":
    """A TrainConfig with recipe `name`'s fields (RECIPES), then `changes`; model_overrides merge."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in RECIPES[name].items()}
    overrides = {**values.pop("model_overrides", {}), **changes.pop("model_overrides", {})}
    return TrainConfig(**{**values, **changes}, model_overrides=overrides)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


# the TrainConfig fields a fine-tuning run takes from its base run (the network it starts from)
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' load_lora_weights looks for
DIFFUSERS_TI_FILE = "learned_embeds.safetensors"  # {token: embedding}, diffusers' load_textual_inversion

INHERITED = (
    "model",
    "model_overrides",
    "prediction",
    "schedule",
    "sigma_data",
    "conditioning",
    "text_encoder",
    "text_encoder_kwargs",
    "sigma_sampler",
    "p_mean",
    "p_std",
    "weighting",
)


@dataclasses.dataclass
class _Base:
    """The trained model a fine-tuning run starts from: its folder, its pipeline (denoiser with the
    EMA weights, text encoder, latent space) and whether it is a diffusers folder."""

    folder: Path
    pipe: Any
    diffusers: bool

    @property
    def config(self) -> dict:
        return self.pipe.config


def base_run(cfg: TrainConfig) -> tuple[TrainConfig, _Base | None]:
    """(cfg with the base's architecture fields, the base) for a fine-tuning run; (cfg, None) when
    training from scratch. `init_from`: a difflab run folder, a zoo model name, or a diffusers
    folder (Stable Diffusion layout; LoRA only: its full weights belong to diffusers' own format)."""
    if not cfg.init_from:
        return cfg, None
    from difflab.pipeline import Pipeline
    from difflab.assets import resolve_run

    folder = resolve_run(cfg.init_from)  # a folder, or a zoo name
    diffusers = (folder / "model_index.json").is_file()
    if not diffusers and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"init_from {cfg.init_from}: no run folder (config.json) or zoo model of that name")
    if diffusers and cfg.finetune == "all":
        raise ValueError(f"init_from {folder} is a diffusers folder: fine-tune it with --finetune lora")
    pipe = Pipeline.from_pretrained(folder)
    if pipe.config.get("adapter"):
        raise ValueError(
            f"init_from {folder} holds LoRA adapters; start from its base {pipe.config['adapter']['base']}"
        )
    if diffusers:  # the DDPM recipe diffusers' models were trained with
        inherited = {
            "model": "diffusers",
            "model_overrides": {},
            "prediction": pipe.denoiser.prediction,
            "schedule": pipe.denoiser.schedule.to_config(),
            "conditioning": pipe.conditioning,
            "sigma_sampler": "discrete_uniform",
            "text_encoder": "minilm",  # unused: the base's own encoder is used, and recorded
            "autoencoder": None,
        }
    else:
        base = pipe.config.get("train") or {}
        missing = [k for k in ("model", "prediction", "schedule", "conditioning") if k not in base]
        if missing:
            raise ValueError(f"init_from {folder}: its config.json records no training fields {missing}")
        inherited = {k: base[k] for k in INHERITED if k in base}
        overrides = dict(base.get("model_overrides") or {})
        if pipe.num_classes is not None:  # the class table as the base built it
            overrides["num_classes"] = pipe.num_classes
        inherited["model_overrides"] = overrides
        spec = pipe.config.get("autoencoder")
        inherited["autoencoder"] = str(folder / spec.get("folder", AUTOENCODER_FOLDER)) if spec else None
    inherited["init_from"] = str(folder)
    return dataclasses.replace(cfg, **inherited), _Base(folder, pipe, diffusers)


def _check_base_fit(data: ImageData, base: _Base) -> None:
    """The user's images fit the base: channels and size, and class labels inside its table."""
    d = base.config["data"]
    want, have = (d["channels"], d["size"], d["size"]), tuple(data.images.shape[1:])
    if have != want:
        raise ValueError(f"images of shape {have} do not fit init_from {base.folder}, which was trained on {want}")
    classes = base.pipe.num_classes
    if classes is not None and data.labels is not None and int(data.labels.max()) >= classes:
        raise ValueError(f"class label {int(data.labels.max())} is outside init_from {base.folder}'s {classes} classes")


def load_training_data(cfg: TrainConfig) -> ImageData:
    kw = dict(cfg.data_kwargs)
    if cfg.data == "fashion_mnist":
        kw.setdefault("pad_to", 32)
    return load_dataset(cfg.data, "train", **kw)


def _new_denoiser(cfg: TrainConfig, data: ImageData, context_dim: int | None = None) -> Preconditioned:
    overrides = dict(in_channels=data.images.shape[1], image_size=data.images.shape[-1])
    if cfg.conditioning == "class":
        if data.labels is None:
            raise ValueError(f"dataset {cfg.data!r} has no labels; use conditioning='none' (class_conditional=False)")
        overrides["num_classes"] = len(data.class_names) or int(data.labels.max()) + 1
    if context_dim is not None:
        overrides["context_dim"] = context_dim
    schedule = schedule_from_config(cfg.schedule)
    discrete = isinstance(schedule, DiscreteVP)
    if not discrete and "learn_sigma" not in cfg.model_overrides and getattr(model_config(cfg.model), "learn_sigma", 0):
        # a paper-size DiT learns its variance by DDPM's bound, which only a DDPM schedule has: on
        # difflab's default EDM recipe it learns the mean alone (model_overrides learn_sigma=True refuses)
        overrides["learn_sigma"] = False
    overrides.update(cfg.model_overrides)
    net = create_model(cfg.model, **overrides)
    learned = bool(getattr(net.config, "learn_sigma", False))
    if learned and not discrete:
        raise ValueError(
            f"learn_sigma=True learns the variance by DDPM's variational bound, which needs a DiscreteVP "
            f"schedule; this run's is {type(schedule).__name__} (use the DDPM recipe: schedule "
            "{'type': 'DiscreteVP', 'kind': 'linear'}, prediction 'eps', sigma_sampler 'discrete_uniform')"
        )
    sigma_data = cfg.sigma_data if cfg.sigma_data is not None else (1.0 if cfg.autoencoder else None)
    return Preconditioned(net, schedule, cfg.prediction, sigma_data=sigma_data, learned_variance=learned)


@dataclasses.dataclass
class _RunInputs:
    """What the network is trained on, and what config.json records about it besides the model."""

    data: ImageData  # images, or their latents
    extras: dict[str, Any]  # config.json sections: "data" (the images), "text_encoder", "autoencoder"
    captions: CaptionTable | None = None
    text_encoder: nn.Module | None = None  # trained jointly with the network (else None)
    context_dim: int | None = None


def _run_inputs(
    cfg: TrainConfig, data: ImageData, out: Path, resume: bool, rank: int, base: _Base | None = None
) -> _RunInputs:
    """Encode captions (text) and images (latent diffusion) once, before the first step."""
    inputs = _RunInputs(
        data,
        {
            "data": {
                "name": data.name,
                "channels": data.images.shape[1],
                "size": data.images.shape[-1],
                "class_names": list(data.class_names),
            }
        },
    )
    if cfg.conditioning == "text":
        if data.captions is None:
            raise ValueError(f"conditioning='text' needs captions, and dataset {cfg.data!r} has none (shapes has them)")
        torch.manual_seed(seed_from(cfg.seed, 0x7E47))  # a jointly trained encoder's initial weights
        ids = None
        if base is not None:  # the base's own encoder (its vocabulary, its weights), frozen
            encoder = base.pipe.text_encoder
            if encoder is None:
                raise ValueError(
                    f"dataset {cfg.data!r} has captions, but init_from {base.folder} is not text-conditional"
                )
            encoder.requires_grad_(False)
            if cfg.finetune == "embeddings":
                _add_learned_token(encoder, cfg.token, cfg.init_token, data.captions)
                ids = True  # token ids: the encoder runs inside the loss, its new row gets gradients
            unknown = encoder.unknown_words(data.captions) if hasattr(encoder, "unknown_words") else []
            if unknown:
                raise ValueError(f"captions use words {unknown[:5]} that init_from's text encoder does not know")
        else:
            encoder = build_text_encoder(cfg.text_encoder, data.captions, cfg.text_encoder_kwargs)
        inputs.captions = CaptionTable(encoder, data.captions, ids=ids)
        inputs.context_dim = encoder.dim
        inputs.text_encoder = encoder if encoder.trainable or ids else None
        inputs.extras["text_encoder"] = base.config["text_encoder"] if base is not None else encoder.config_dict()
    if base is not None and base.diffusers and base.pipe.latent_space is not None:  # its VAE, kept in the base
        inputs.data = encode_latents(base.pipe.latent_space, data)
        inputs.extras["autoencoder"] = dict(base.config["autoencoder"])
    elif cfg.autoencoder:
        from difflab.nn.autoencoder import save_latent_space

        copy = out / AUTOENCODER_FOLDER  # a resumed run encodes with the copy it started with
        adapter = cfg.finetune != "all"  # an adapter run stays small: it decodes with its base's
        space = open_autoencoder(copy if resume and not adapter else cfg.autoencoder, data)
        if rank == 0 and not resume and not adapter:
            save_latent_space(space, copy, source=str(cfg.autoencoder))
        inputs.data = encode_latents(space, data)
        inputs.extras["autoencoder"] = {
            "folder": AUTOENCODER_FOLDER,
            "source": str(cfg.autoencoder),
            "scale_factor": space.scale,
            "latent_shape": list(space.latent_shape),
        }
    return inputs


def _add_learned_token(encoder: nn.Module, token: str, init_token: str, captions) -> None:
    """Textual Inversion's pseudo-word: a new row of the embedding table, initialised from a coarse
    word, the only weight that trains (a gradient mask zeroes every other row's gradient; with no
    weight decay on it, AdamW leaves those rows bit for bit)."""
    if not any(token in c for c in captions):
        raise ValueError(f"no caption uses the token {token!r}: caption the concept's images with it ('a {token}')")
    (row,) = encoder.add_tokens([token], init_from=init_token)
    weight = encoder.token_embedding.weight
    keep = torch.zeros(weight.shape[0], 1, device=weight.device)
    keep[row] = 1
    weight.requires_grad_(True)
    weight.register_hook(lambda g: g * keep.to(g.device, g.dtype))
    encoder.learned_tokens = {token: row}


def _model_state(denoiser: Preconditioned, text_encoder: nn.Module | None = None) -> dict[str, Tensor]:
    """The trained tensors: the network's, and a jointly trained text encoder's as "text_encoder.*";
    of a LoRA run, its adapters alone; of Textual Inversion, its token's embedding row."""
    learned = getattr(text_encoder, "learned_tokens", None)
    if learned:
        weight = text_encoder.token_embedding.weight
        return {f"token.{t}": weight[i] for t, i in learned.items()}
    if has_lora(denoiser.net):
        return lora_state(denoiser.net)
    state = dict(denoiser.net.state_dict())
    if text_encoder is not None:
        state.update({TRAINABLE_PREFIX + k: v for k, v in text_encoder.state_dict().items()})
    return state


def _load_model_state(
    denoiser: Preconditioned, text_encoder: nn.Module | None, state: dict[str, Tensor], path: Path
) -> None:
    learned = getattr(text_encoder, "learned_tokens", None)
    if learned:
        with torch.no_grad():
            for t, i in learned.items():
                text_encoder.token_embedding.weight[i] = state[f"token.{t}"]
        return
    if has_lora(denoiser.net):
        load_lora_state(denoiser.net, state)
        return
    if text_encoder is None:
        load_weights(denoiser.net, state, path)
        return
    n = len(TRAINABLE_PREFIX)
    load_weights(denoiser.net, {k: v for k, v in state.items() if not k.startswith(TRAINABLE_PREFIX)}, path)
    load_weights(text_encoder, {k[n:]: v for k, v in state.items() if k.startswith(TRAINABLE_PREFIX)}, path)


def _normalised(saved: dict) -> dict:
    """A checkpoint's TrainConfig with today's defaults filled in (older runs lack newer fields)."""
    try:
        return dataclasses.asdict(TrainConfig.from_dict(saved))
    except (TypeError, ValueError):
        return saved


def _lr_at(cfg: TrainConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


def _ema_decay_at(cfg: TrainConfig, step: int) -> float:
    """EMA with a warm-up (decay grows as (1 + s)/(10 + s) up to ema_decay): short runs need it."""
    return min(cfg.ema_decay, (1 + step) / (10 + step))


def _optimizer_tensors(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> dict[str, Tensor]:
    out = {}
    for i, p in enumerate(params):
        for key, value in opt.state.get(p, {}).items():
            out[f"optim.{i}.{key}"] = value if isinstance(value, Tensor) else torch.tensor(value)
    return out


def _load_optimizer(opt: torch.optim.Optimizer, params: list[nn.Parameter], tensors: dict[str, Tensor]) -> None:
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        _, i, key = name.split(".", 2)
        opt.state[params[int(i)]][key] = value.clone()


# --------------------------------------------------------------------------------------------
# Saving and loading a run
# --------------------------------------------------------------------------------------------


def _run_config(cfg: TrainConfig, denoiser: Preconditioned, inputs: _RunInputs) -> dict:
    adapter = None
    if has_lora(denoiser.net):
        adapter = {"kind": "lora", "base": cfg.init_from, **denoiser.net.lora_config}
    elif cfg.finetune == "embeddings":
        adapter = {"kind": "textual_inversion", "base": cfg.init_from, "tokens": {cfg.token: cfg.init_token}}
    if adapter:  # adapters and the base they fit: Pipeline.from_pretrained puts them together
        return {
            "format": CHECKPOINT_FORMAT,
            "adapter": adapter,
            "model": json.loads(json.dumps(getattr(denoiser.net, "config_dict", dict)())),
            "schedule": denoiser.schedule.to_config(),
            "prediction": denoiser.prediction,
            "sigma_data": denoiser.sigma_data,
            **{k: v for k, v in inputs.extras.items() if k != "autoencoder"},
            "train": dataclasses.asdict(cfg),
        }
    return {
        "format": CHECKPOINT_FORMAT,
        "model": denoiser.net.config_dict(),
        "schedule": denoiser.schedule.to_config(),
        "prediction": denoiser.prediction,
        "sigma_data": denoiser.sigma_data,
        **inputs.extras,  # "data" (the images, also of a latent run), "text_encoder", "autoencoder"
        "train": dataclasses.asdict(cfg),
    }


def _save(
    out: Path,
    cfg: TrainConfig,
    denoiser,
    ema: dict[str, Tensor],
    opt,
    params,
    step: int,
    elapsed: float,
    inputs: _RunInputs,
) -> None:
    raw = {f"model.{k}": v for k, v in _model_state(denoiser, inputs.text_encoder).items()}
    ema_t = {f"ema.{k}": v for k, v in ema.items()}
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": str(step),
        "elapsed": f"{elapsed:.3f}",
        "config": json.dumps(dataclasses.asdict(cfg)),
    }
    write_run_save(
        out,
        step,
        checkpoint={**raw, **ema_t, **_optimizer_tensors(opt, params)},
        checkpoint_meta=meta,
        weights=ema,
        config=_run_config(cfg, denoiser, inputs),
    )
    diffusers_base = cfg.init_from and (Path(cfg.init_from) / "model_index.json").is_file()
    if cfg.finetune == "embeddings" and diffusers_base:  # what diffusers' load_textual_inversion reads
        atomic_save_safetensors({cfg.token: ema[f"token.{cfg.token}"].contiguous()}, out / DIFFUSERS_TI_FILE)
    if has_lora(denoiser.net) and diffusers_base:
        # the adapters as diffusers' load_lora_weights reads them ("unet.<module>.lora_A/B.weight"); diffusers
        # takes alpha = rank, so another alpha's scale is folded into lora_B
        scale = denoiser.net.lora_config["alpha"] / denoiser.net.lora_config["rank"]
        lora = {k: (v * scale if ".lora_B." in k else v).contiguous() for k, v in ema.items()}
        atomic_save_safetensors(lora, out / DIFFUSERS_LORA_FILE)


def _log_rows_upto(log_path: Path, step: int) -> list[str]:
    """The complete rows of log.jsonl with step <= `step` (a kill mid-write leaves a partial row)."""
    rows = []
    for line in log_path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            rows.append(line)
    return rows


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _dist() -> tuple[int, int]:
    """(rank, world size); joins the process group that torchrun's environment describes."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":  # one GPU per process: rank r of this node uses cuda:LOCAL_RANK
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _default_device(world: int) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if world > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cuda")


def train(
    cfg: TrainConfig,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    data: ImageData | None = None,
    stop_after: int | None = None,
) -> Path:
    """Train per `cfg`, writing the run folder `out`. Returns the folder.

    A folder that already holds a run is continued (`resume`) or replaced (`overwrite`), never
    silently overwritten; one writer at a time (`RunLock`: a second one is refused, naming the
    first). `stop_after` ends this call after that many steps (for tests: a run "killed" mid-way).
    """
    cfg.validate()
    out = Path(out)
    if resume and overwrite:
        raise ValueError(
            "resume and overwrite contradict each other: --resume continues the run in --out, --overwrite replaces it"
        )
    if resume and not out.is_dir():
        raise FileNotFoundError(f"--resume: run folder {out} does not exist")
    if not resume:
        check_new_folder(out, overwrite=overwrite)  # before loading any data
    rank, world = _dist()
    if rank != 0:  # rank 0 holds the folder for every rank
        return _train(cfg, out, resume, progress, device, data, stop_after, rank, world)
    with RunLock(out):
        if not resume and check_new_folder(out, overwrite=overwrite):
            _remove_run_files(out)
        return _train(cfg, out, resume, progress, device, data, stop_after, rank, world)


def _remove_run_files(out: Path) -> None:
    """What `train` writes, so that an overwritten folder never mixes two runs."""
    import shutil

    for name in ("checkpoint.safetensors", "model.safetensors", "config.json", "log.jsonl", "loss.png"):
        (out / name).unlink(missing_ok=True)
    if (out / AUTOENCODER_FOLDER).is_dir():
        shutil.rmtree(out / AUTOENCODER_FOLDER)


def _train(
    cfg: TrainConfig,
    out: Path,
    resume: bool,
    progress: bool,
    device,
    data: ImageData | None,
    stop_after: int | None,
    rank: int,
    world: int,
) -> Path:
    device = torch.device(device) if device is not None else _default_device(world)
    cfg, base = base_run(cfg)  # a fine-tuning run takes its architecture (and weights) from the base
    micro = cfg.batch_size // cfg.grad_accum
    if micro % world:
        raise ValueError(
            f"micro-batch {micro} (batch_size {cfg.batch_size} / grad_accum {cfg.grad_accum}) "
            f"is not divisible by the {world} processes"
        )
    if cfg.autoencoder and not resume and not Path(cfg.autoencoder).is_dir():  # before loading the data
        raise FileNotFoundError(
            f"autoencoder folder {cfg.autoencoder} does not exist "
            f"(train one with `difflab train-autoencoder --out {cfg.autoencoder}`)"
        )
    data = data if data is not None else load_training_data(cfg)
    if data.images.shape[0] < cfg.batch_size:
        raise ValueError(
            f"dataset {cfg.data!r} has {data.images.shape[0]} images, fewer than batch_size {cfg.batch_size}"
        )
    bad = (~torch.isfinite(data.images)).flatten(1).any(1).nonzero().flatten()
    if bad.numel():
        raise ValueError(
            f"dataset {cfg.data!r} has NaN/inf pixels in {bad.numel()} image(s), first at index {bad[0].item()}"
        )
    if base is not None:
        _check_base_fit(data, base)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)  # left by a run killed mid-write

    inputs = _run_inputs(cfg, data, out, resume, rank, base)
    data, text_encoder = inputs.data, inputs.text_encoder
    torch.manual_seed(cfg.seed)
    if base is not None:  # the base's network with its EMA weights, the ones it samples with
        denoiser = base.pipe.denoiser.requires_grad_(cfg.finetune == "all")
    else:
        denoiser = _new_denoiser(cfg, data, inputs.context_dim)
    if cfg.finetune == "lora":
        add_lora(denoiser.net, cfg.lora_rank, cfg.lora_alpha)
    denoiser = denoiser.to(device)
    denoiser.net.gradient_checkpointing = cfg.gradient_checkpointing
    params = [p for p in denoiser.net.parameters() if p.requires_grad]
    if text_encoder is not None:
        text_encoder.to(device)
        params += [p for p in text_encoder.parameters() if p.requires_grad]
    # Textual Inversion: no weight decay, so the masked rows of the embedding table stay bit for bit
    wd = 0.0 if cfg.finetune == "embeddings" else cfg.weight_decay
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=wd)
    ema = {k: v.detach().clone() for k, v in _model_state(denoiser, text_encoder).items()}
    step, elapsed = 0, 0.0
    log_path = out / "log.jsonl"

    ckpt = out / "checkpoint.safetensors"
    if resume:
        if not ckpt.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
        tensors, meta = read_safetensors(ckpt)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{ckpt} is not a difflab checkpoint (format {meta.get('format')!r})")
        saved_cfg = _normalised(json.loads(meta["config"]))
        for key in (
            "model",
            "model_overrides",
            "prediction",
            "schedule",
            "sigma_data",
            "data",
            "data_kwargs",
            "conditioning",
            "text_encoder",
            "text_encoder_kwargs",
            "autoencoder",
            "batch_size",
            "seed",
        ):
            if saved_cfg.get(key) != dataclasses.asdict(cfg).get(key):
                raise ValueError(
                    f"--resume: {key} differs from the checkpoint's "
                    f"({saved_cfg.get(key)!r} there, {dataclasses.asdict(cfg).get(key)!r} now)"
                )
        _load_model_state(
            denoiser, text_encoder, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, ckpt
        )
        ema = {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("ema.")}
        if set(ema) != set(ema_keys := _model_state(denoiser, text_encoder)):
            raise ValueError(
                f"{ckpt} has EMA tensors that do not fit this network "
                f"({len(set(ema_keys) - set(ema))} missing, {len(set(ema) - set(ema_keys))} unexpected)"
            )
        _load_optimizer(opt, params, {k: v.to(device) for k, v in tensors.items()})
        step, elapsed = int(meta["step"]), float(meta.get("elapsed", 0))
        if rank == 0 and log_path.exists():  # keep the rows up to the checkpoint; drop the killed tail
            atomic_write_bytes(log_path, "".join(r + "\n" for r in _log_rows_upto(log_path, step)).encode())
    elif rank == 0 and log_path.exists():
        log_path.unlink()

    if denoiser.learned_variance and cfg.sigma_sampler != "discrete_uniform":
        raise ValueError(
            "a learned-variance network trains on DDPM's timesteps (L_hybrid): sigma_sampler must be "
            f"'discrete_uniform', got {cfg.sigma_sampler!r}"
        )
    loss_fn = DenoisingLoss(
        lognormal(cfg.p_mean, cfg.p_std) if cfg.sigma_sampler == "lognormal" else discrete_uniform(denoiser.schedule),
        cfg.weighting,
        vlb_weight=cfg.vlb_weight if denoiser.learned_variance else 0.0,
    )
    step_loss = _LossModule(denoiser, loss_fn, text_encoder)
    if world > 1:
        step_loss = nn.parallel.DistributedDataParallel(
            step_loss, device_ids=[device.index] if device.type == "cuda" else None
        )
    n = data.images.shape[0]
    item_weight = data.meta.get("loss_weight")  # (N,) per-item loss weights, or None
    if item_weight is not None:
        item_weight = torch.as_tensor(item_weight, dtype=torch.float32)
        if item_weight.shape != (n,) or not torch.isfinite(item_weight).all() or (item_weight < 0).any():
            raise ValueError(f"data.meta['loss_weight'] must be {n} finite non-negative numbers")
    pbar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        pbar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True)
    clock = time.process_time if cfg.clock == "cpu" else time.perf_counter
    t_start = clock() - elapsed
    ran, window_t, window_n, losses = 0, time.perf_counter(), 0, []
    denoiser.train()
    while True:
        if cfg.steps is not None and step >= cfg.steps:
            break
        if cfg.minutes is not None and _time_is_up(clock() - t_start >= cfg.minutes * 60, world, device):
            break
        if stop_after is not None and ran >= stop_after:
            break
        # ---- the batch and all randomness of this step, from (seed, step) alone -------------
        torch.manual_seed(seed_from(cfg.seed, step, 1))  # dropout, label dropout inside the net
        g = torch.Generator().manual_seed(seed_from(cfg.seed, step, 2))
        idx = batch_indices(n, cfg.batch_size, cfg.seed, step)
        x0 = data.images[idx]
        if cfg.flip:
            flip = torch.rand(cfg.batch_size, generator=g) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        sigma = loss_fn.sigma_sampler(cfg.batch_size, g)
        noise = torch.randn(x0.shape, generator=g)
        cond = {}
        if cfg.conditioning == "class":
            labels = data.labels[idx].clone()
            drop = torch.rand(cfg.batch_size, generator=g) < cfg.label_dropout
            cond["class_labels"] = labels.masked_fill(drop, -1)
        elif cfg.conditioning == "text":  # dropped captions become the empty prompt
            drop = torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout
            cond.update(inputs.captions.batch(idx, drop))
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        # ---- forward/backward over micro-batches; this rank's share of each --------------
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for a in range(0, cfg.batch_size, micro):
            share = torch.arange(a, a + micro)[rank::world]
            xb, sb, nb = x0[share].to(device), sigma[share], noise[share].to(device)
            cb = {k: v[share].to(device) for k, v in cond.items()}
            wb = None if item_weight is None else item_weight[idx][share]
            last = a + micro >= cfg.batch_size  # DDP all-reduces the gradients after the last one
            with step_loss.no_sync() if world > 1 and not last else contextlib.nullcontext():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss = step_loss(xb, sb, nb, cb) if wb is None else step_loss(xb, sb, nb, cb, wb)
                (loss / cfg.grad_accum).backward()
            total += loss.detach().float() / cfg.grad_accum
        if world > 1:  # the global batch's loss, so every rank sees (and stops on) the same value
            torch.distributed.all_reduce(total)
            total /= world
        total = total.item()
        hint = f"lower lr (now {cfg.lr}); the last checkpoint in {out} is the last good state"
        if not math.isfinite(total):
            raise FloatingPointError(f"loss is {total} at step {step + 1}; {hint}")
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        check_training_state(step + 1, total, params, hint)
        decay = _ema_decay_at(cfg, step)
        with torch.no_grad():
            for k, v in _model_state(denoiser, text_encoder).items():
                if v.dtype.is_floating_point:
                    ema[k].lerp_(v, 1 - decay)
                else:
                    ema[k].copy_(v)
        step += 1
        ran += 1
        losses.append(total)
        window_n += cfg.batch_size
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
            now = time.perf_counter()
            row = {
                "step": step,
                "loss": sum(losses) / len(losses),
                "lr": _lr_at(cfg, step - 1),
                "img_per_s": window_n / max(now - window_t, 1e-9),
                "time": clock() - t_start,
            }
            if cfg.clock == "cpu":
                row["clock"] = "cpu"
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if pbar is not None:
                pbar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}")
            losses, window_t, window_n = [], now, 0
        if pbar is not None:
            pbar.update(1)
        if rank == 0 and cfg.save_every and step % cfg.save_every == 0:
            _save(out, cfg, denoiser, ema, opt, params, step, clock() - t_start, inputs)
    if pbar is not None:
        pbar.close()
    if rank == 0:
        _save(out, cfg, denoiser, ema, opt, params, step, clock() - t_start, inputs)
        plot_loss(out)
    if world > 1:
        torch.distributed.barrier()
    return out


def _time_is_up(up: bool, world: int, device: torch.device) -> bool:
    """Rank 0's clock decides for every rank (ranks that disagreed would wait on each other forever)."""
    if world == 1:
        return up
    flag = torch.tensor(float(up), device=device)
    torch.distributed.broadcast(flag, 0)
    return bool(flag.item())


class _LossModule(nn.Module):
    """The loss as a module, so DistributedDataParallel can wrap it and all-reduce gradients."""

    def __init__(self, denoiser: Preconditioned, loss_fn: DenoisingLoss, text_encoder: nn.Module | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.loss_fn = loss_fn
        self.text_encoder = text_encoder  # trained jointly: its gradients flow (and DDP averages them)

    def forward(self, x0: Tensor, sigma: Tensor, noise: Tensor, cond: dict, weight: Tensor | None = None) -> Tensor:
        if "token_ids" in cond:  # token ids -> token states, inside the graph
            cond = dict(cond)
            cond["context"] = self.text_encoder.encode(cond.pop("token_ids"), cond["context_mask"])
        if weight is None:
            return self.loss_fn(self.denoiser, x0, sigma=sigma, noise=noise, **cond)
        # per-item weights (DreamBooth's prior-preservation lambda on the class images)
        losses = self.loss_fn(self.denoiser, x0, sigma=sigma, noise=noise, reduce=False, **cond)
        return (losses * weight.to(losses.device, losses.dtype)).mean()


def plot_loss(run: str | os.PathLike) -> Path | None:
    """loss.png from log.jsonl (smoothed training loss against step)."""
    run = Path(run)
    log = run / "log.jsonl"
    if not log.exists():
        return None
    rows = [json.loads(r) for r in log.read_text().splitlines() if r.strip()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = run / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
