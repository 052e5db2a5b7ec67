"""A diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)
as the pieces of a difflab `Pipeline`: denoiser, text encoder, latent space and config. Two layouts:
Stable Diffusion's (below), a pixel UNet2DModel with a scheduler (DDPMPipeline, DDIMPipeline:
unconditional, or class-conditional through the UNet's class embedding, which has no null class),
and DiT's (DiTPipeline: transformer/ DiTTransformer2DModel, vae/, scheduler/; label 1000 of the
ImageNet models is the null class of classifier-free guidance).

    pipe = Pipeline.from_pretrained("stable-diffusion-folder")        # detects model_index.json
    images = pipe(4, prompt="a photo of a cat", guidance_scale=7.5, sampler="euler", steps=30)

The mapping (Stable Diffusion layout):

| diffusers                                   | difflab                                               |
|---------------------------------------------|-------------------------------------------------------|
| unet/ (UNet2DConditionModel)                | `diffusers_denoiser`: Preconditioned(DiffusersUNet)   |
| scheduler/ (betas, prediction_type, spacing)| its DiscreteVP and prediction; the sampling grid uses |
|                                             | the config's timestep_spacing and steps_offset        |
| vae/ (AutoencoderKL, scaling_factor)        | `DiffusersLatentSpace`: decode(z) = vae.decode(z / s) |
| text_encoder/ + tokenizer/ (CLIP)           | `CLIPPromptEncoder`: padded to max_length, all tokens |
|                                             | attended (as the pipeline feeds the UNet)             |

With the same starting `latents` (unit Gaussian, diffusers' `latents=` argument), prompt and
scheduler settings, difflab's samplers give diffusers' pipeline outputs: DDIM is difflab's
`euler` on the scheduler's grid, and every other difflab sampler, guidance and editing method
runs on the same folder. diffusers and transformers are imported only when a folder is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from difflab.interop.diffusers import diffusers_denoiser

__all__ = [
    "is_diffusers_folder",
    "load_diffusers_folder",
    "scheduler_sigmas",
    "scheduler_start",
    "CLIPPromptEncoder",
    "DiffusersLatentSpace",
]

# diffusers scheduler classes whose config maps to a difflab DiscreteVP (the samplers are difflab's own)
SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "KDPM2DiscreteScheduler",
)
# EDM schedulers: the UNet is preconditioned by Karras et al.'s c_in, c_noise = ln(sigma) / 4, c_skip, c_out
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")


def is_diffusers_folder(path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def _component(folder: Path, index: dict, name: str, expected: tuple[str, ...]) -> str:
    """The class name of a component of model_index.json, checked; a ValueError naming what is wrong."""
    entry = index.get(name)
    if not entry or not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
        raise ValueError(f"{folder / 'model_index.json'} names no {name} component (a Stable Diffusion layout has one)")
    if not (folder / name).is_dir():
        raise FileNotFoundError(f"diffusers folder {folder} has no {name}/ folder (model_index.json lists it)")
    cls = entry[1]
    if cls not in expected:
        raise ValueError(f"{folder / name}: {cls} is not supported here; supported: {', '.join(expected)}")
    return cls


def _weights_file(folder: Path) -> None:
    if not list(folder.glob("*.safetensors")):
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.ckpt")]
        if pickles:
            raise ValueError(
                f"{folder} holds only pickle weights ({', '.join(pickles)}); difflab loads safetensors only "
                "(convert them, e.g. by saving the model with safe_serialization=True)"
            )
        raise FileNotFoundError(f"{folder} has no weights (*.safetensors)")


class CLIPPromptEncoder(nn.Module):
    """A transformers CLIP text model + tokenizer as a difflab text encoder:
    `encoder(prompts, truncate) -> (states (B, T, D), mask (B, T))`, T = the tokenizer's max length,
    every position attended (the Stable Diffusion pipelines feed the UNet all 77 states)."""

    trainable = False

    def __init__(self, tokenizer, text_encoder: nn.Module):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.max_length = int(tokenizer.model_max_length)
        self.dim = int(text_encoder.config.hidden_size)

    def tokenize(self, prompts: list[str], truncate: bool = True) -> dict:
        return self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=truncate, return_tensors="pt"
        )

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.text_encoder.get_input_embeddings()

    def add_tokens(self, tokens, init_from: str | None = None) -> list[int]:
        """New pseudo-words (Textual Inversion's "<S*>"), rows initialised from `init_from`'s mean embedding."""
        from difflab.nn.text import add_hf_tokens

        return add_hf_tokens(self.tokenizer, self.text_encoder, tokens, init_from)

    def token_ids(self, prompts, truncate: bool = False) -> tuple[Tensor, Tensor]:
        ids = self.tokenize(list(prompts), truncate)["input_ids"]
        return ids, torch.ones(ids.shape, dtype=torch.bool)

    def encode(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Token states of token ids, with gradients (the pipeline attends every position)."""
        return self.text_encoder(ids.to(next(self.text_encoder.parameters()).device))[0]

    @torch.no_grad()
    def forward(self, prompts, truncate: bool = False) -> tuple[Tensor, Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not truncate:
            for p in prompts:
                n = len(self.tokenizer(p, truncation=False)["input_ids"])
                if n > self.max_length:
                    raise ValueError(
                        f"prompt {p[:40]!r}... is {n} tokens; the text encoder takes {self.max_length} "
                        "(pass truncate=True / --truncate to cut it)"
                    )
        ids = self.tokenize(prompts)["input_ids"].to(next(self.text_encoder.parameters()).device)
        states = self.text_encoder(ids)[0]
        return states, torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)


class DiffusersLatentSpace:
    """A diffusers AutoencoderKL as difflab's latent space: decode(z) = vae.decode(z / scaling_factor),
    encode(x) = the posterior mean * scaling_factor."""

    def __init__(self, vae: nn.Module, latent_shape: tuple[int, int, int]):
        self.autoencoder = vae.eval().requires_grad_(False)
        self.scale = float(getattr(vae.config, "scaling_factor", 0.18215))
        self.latent_shape = tuple(latent_shape)

    def decode(self, z: Tensor) -> Tensor:  # differentiable: guidance through the decoder (Blended Diffusion)
        vae = self.autoencoder
        return vae.decode(z.to(next(vae.parameters()).dtype) / self.scale).sample.float()

    @torch.no_grad()
    def encode(self, x: Tensor, batch_size: int = 64) -> Tensor:
        vae = self.autoencoder
        dtype, device = next(vae.parameters()).dtype, next(vae.parameters()).device
        out = [
            vae.encode(x[i : i + batch_size].to(device, dtype)).latent_dist.mean.float().cpu() * self.scale
            for i in range(0, len(x), batch_size)
        ]
        return torch.cat(out).to(x.device)


def _scheduler(spec: dict, steps: int):
    import diffusers

    scheduler = getattr(diffusers, spec["scheduler_class"]).from_config(spec["scheduler"])
    scheduler.set_timesteps(steps)
    return scheduler


def scheduler_start(spec: dict, schedule, steps: int) -> float:
    """The factor diffusers multiplies unit-Gaussian latents by at the start, in difflab's VE
    coordinates. Schedulers that integrate in sigma space (Euler, Heun, LMS, ...) say it as their
    init_noise_sigma (sigma_max for linspace/trailing spacing, sqrt(sigma_max^2 + 1) for leading);
    the others (DDIM, DDPM, PNDM, DPM-Solver, UniPC: init_noise_sigma 1) start at the VP point,
    sqrt(1 + sigma_0^2) in VE."""
    scheduler = _scheduler(spec, steps)
    if (
        spec["scheduler_class"] in EDM_SCHEDULERS
    ):  # their init_noise_sigma is sqrt(sigma_max^2 + 1); EDM starts at sigma_max
        return float(scheduler.sigmas[0])
    init = float(scheduler.init_noise_sigma)
    if init != 1.0:
        return init
    return (1 + float(scheduler_sigmas(spec, schedule, steps)[0]) ** 2) ** 0.5


def scheduler_sigmas(spec: dict, schedule, steps: int) -> Tensor:
    """The sigma grid diffusers' scheduler of the folder walks for `steps` steps: its own
    set_timesteps (each scheduler spaces timesteps its own way), as difflab sigmas. Schedulers that
    keep sigmas (Euler, DPM-Solver, Heun, ...) give them directly (a repeated value of a two-stage
    method counted once); DDIM/DDPM/PNDM give timesteps, mapped through the schedule, and end at
    their final alpha (sigma 0, or the first training level when set_alpha_to_one is false)."""
    scheduler = _scheduler(spec, steps)
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sigmas, Tensor) and sigmas.numel() > 1:
        return torch.unique_consecutive(sigmas.to(torch.float64))
    ts = torch.unique_consecutive(torch.as_tensor(scheduler.timesteps).long())
    grid = schedule.sigmas[ts].to(torch.float64)
    final = float(getattr(scheduler, "final_alpha_cumprod", torch.tensor(1.0)))
    last = ((1 - final) / final) ** 0.5 if final < 1 else 0.0
    return torch.cat([grid, torch.tensor([last], dtype=torch.float64)])


def _edm_denoiser(unet: nn.Module, scheduler: dict):
    """Preconditioned(DiffusersUNet(unet), EDM schedule, "edm") from an EDM scheduler config."""
    from difflab.core.denoiser import Preconditioned
    from difflab.core.schedules import EDM
    from difflab.interop.diffusers import DiffusersUNet

    if scheduler.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"EDM scheduler prediction_type {scheduler['prediction_type']!r} is not supported (epsilon)")
    schedule = EDM(
        sigma_min=float(scheduler.get("sigma_min", 0.002)),
        sigma_max=float(scheduler.get("sigma_max", 80.0)),
        sigma_data=float(scheduler.get("sigma_data", 0.5)),
        rho=float(scheduler.get("rho", 7.0)),
    )
    return Preconditioned(DiffusersUNet(unet), schedule, "edm").eval()


def _load_pixel_unet(folder: Path, index: dict) -> tuple:
    """A DDPM/DDIM-style folder: a UNet2DModel on pixels (unconditional, or class-conditional through
    its class embedding) and a scheduler. A folder written by `difflab export` carries
    difflab_config.json: its class table's last row is the null class, and its data's class names."""
    scheduler_cls = _component(folder, index, "scheduler", SCHEDULERS + EDM_SCHEDULERS)
    _weights_file(folder / "unet")
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise ValueError(f"loading a diffusers folder needs diffusers: {e}") from None
    scheduler = _read(folder / "scheduler" / "scheduler_config.json")
    unet = UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True)
    if scheduler_cls in EDM_SCHEDULERS:
        denoiser = _edm_denoiser(unet, scheduler)
    else:
        denoiser = diffusers_denoiser(unet, scheduler)
    size = unet.config.sample_size
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    classes = int(unet.config.num_class_embeds) if unet.config.num_class_embeds else None
    origin = _read(folder / "difflab_config.json") if (folder / "difflab_config.json").is_file() else {}
    data = {"name": "diffusers", "channels": int(unet.config.in_channels), "size": size}
    train = {}
    if origin and classes:  # difflab's export: num_classes + the null row
        classes -= 1
        denoiser.net.null_class = classes
        train["label_dropout"] = float(origin.get("train", {}).get("label_dropout", 0.0) or 0.0)
        data.update({k: origin["data"][k] for k in ("name", "class_names") if k in origin.get("data", {})})
    config = {
        "model": {"arch": "diffusers", "class": "UNet2DModel", "num_classes": classes},
        "data": data,
        "diffusers": {"folder": str(folder), "scheduler_class": scheduler_cls, "scheduler": scheduler},
        "prediction": denoiser.prediction,
        "train": train,
    }
    return denoiser, config, None, None


def _load_dit(folder: Path, index: dict) -> tuple:
    """A DiTPipeline folder: a class-conditional DiTTransformer2DModel on the latents of an
    AutoencoderKL. Its label table's last row is the null class (label 1000 for ImageNet DiTs), so
    classifier-free guidance works; the learned-variance half of its output is set aside, as
    DiTPipeline does. Class names come from model_index.json's id2label when present."""
    scheduler_cls = _component(folder, index, "scheduler", SCHEDULERS)
    cls = _component(folder, index, "transformer", ("DiTTransformer2DModel", "Transformer2DModel"))
    _component(folder, index, "vae", ("AutoencoderKL",))
    for name in ("transformer", "vae"):
        _weights_file(folder / name)
    try:
        import diffusers
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ValueError(f"loading a diffusers folder needs diffusers: {e}") from None
    scheduler = _read(folder / "scheduler" / "scheduler_config.json")
    # an older hub folder names the generic Transformer2DModel; its DiT config loads as DiTTransformer2DModel
    config = _read(folder / "transformer" / "config.json")
    if cls == "Transformer2DModel" and config.get("norm_type") != "ada_norm_zero":
        raise ValueError(f"{folder / 'transformer'}: a Transformer2DModel that is not a DiT (norm_type ada_norm_zero)")
    transformer = diffusers.DiTTransformer2DModel.from_pretrained(folder / "transformer", use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True)
    if vae.config.latent_channels != transformer.config.in_channels:
        raise ValueError(
            f"{folder}: the VAE makes {vae.config.latent_channels}-channel latents, the transformer takes "
            f"{transformer.config.in_channels} channels"
        )
    denoiser = diffusers_denoiser(transformer, scheduler)
    net = denoiser.net
    size = int(transformer.config.sample_size)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    names = index.get("id2label") or {}
    class_names = [names.get(str(i), str(i)).split(",")[0].strip() for i in range(net.num_classes)] if names else []
    config = {
        "model": {"arch": "diffusers", "class": "DiTTransformer2DModel", "num_classes": net.num_classes},
        "data": {"name": "diffusers", "channels": int(vae.config.in_channels), "size": size * factor},
        "autoencoder": {"kind": "diffusers", "folder": "vae"},
        "diffusers": {"folder": str(folder), "scheduler_class": scheduler_cls, "scheduler": scheduler},
        "prediction": denoiser.prediction,
        # the null row was trained by the model's own label dropout (DiT: 10%)
        "train": {"label_dropout": 0.1 if net.null_class is not None else 0.0},
    }
    if class_names:
        config["data"]["class_names"] = class_names
    latent_space = DiffusersLatentSpace(vae, (int(transformer.config.in_channels), size, size))
    return denoiser, config, None, latent_space


def load_diffusers_folder(folder) -> tuple:
    """(denoiser, config, text_encoder, latent_space) of a diffusers folder: the Stable Diffusion
    layout (UNet2DConditionModel, AutoencoderKL, CLIP), a pixel UNet2DModel (DDPM/DDIM pipelines)
    or a DiT (DiTTransformer2DModel on AutoencoderKL latents, class-conditional with a null class);
    one-line errors for a missing component, an unknown scheduler, mismatched channels or
    pickle-only weights."""
    folder = Path(folder)
    index = _read(folder / "model_index.json")
    if "transformer" in index:
        return _load_dit(folder, index)
    unet_cls = _component(folder, index, "unet", ("UNet2DConditionModel", "UNet2DModel"))
    if unet_cls == "UNet2DModel":
        return _load_pixel_unet(folder, index)
    scheduler_cls = _component(folder, index, "scheduler", SCHEDULERS)
    _component(folder, index, "vae", ("AutoencoderKL",))
    _component(folder, index, "text_encoder", ("CLIPTextModel",))
    _component(folder, index, "tokenizer", ("CLIPTokenizer", "CLIPTokenizerFast"))
    for name in ("unet", "vae", "text_encoder"):
        _weights_file(folder / name)
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as e:
        raise ValueError(f"loading a diffusers folder needs diffusers and transformers: {e}") from None
    scheduler = _read(folder / "scheduler" / "scheduler_config.json")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True)
    text_model = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    if vae.config.latent_channels != unet.config.in_channels:
        raise ValueError(
            f"{folder}: the VAE makes {vae.config.latent_channels}-channel latents, the UNet takes "
            f"{unet.config.in_channels} channels"
        )
    if text_model.config.hidden_size != unet.config.cross_attention_dim:
        raise ValueError(
            f"{folder}: the text encoder gives {text_model.config.hidden_size}-d states, the UNet's "
            f"cross-attention takes {unet.config.cross_attention_dim}"
        )
    denoiser = diffusers_denoiser(unet, scheduler)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = int(
        unet.config.sample_size
        if not isinstance(unet.config.sample_size, (list, tuple))
        else unet.config.sample_size[0]
    )
    config = {
        "model": {"arch": "diffusers", "class": "UNet2DConditionModel", "num_classes": None},
        "data": {"name": "diffusers", "channels": int(vae.config.in_channels), "size": size * factor},
        "text_encoder": {"kind": "clip", "folder": "text_encoder"},
        "autoencoder": {"kind": "diffusers", "folder": "vae"},
        "diffusers": {"folder": str(folder), "scheduler_class": scheduler_cls, "scheduler": scheduler},
        "prediction": denoiser.prediction,
    }
    latent_space = DiffusersLatentSpace(vae, (int(unet.config.in_channels), size, size))
    return denoiser, config, CLIPPromptEncoder(tokenizer, text_model), latent_space
