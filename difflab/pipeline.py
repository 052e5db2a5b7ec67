"""A trained model as one object: load a run folder, sample images, save it elsewhere.

    pipe = Pipeline.from_pretrained("runs/fmnist")
    images = pipe(16, class_labels=3, guidance_scale=2.0, sampler="dpmpp_2m", steps=20, seed=0)
    pipe.save_pretrained("my_model")         # config.json + model.safetensors

    pipe = Pipeline.from_pretrained("runs/shapes_text")      # text-conditional, pixels or latents
    images = pipe(8, prompt="a red circle on the left", negative_prompt="a blue square",
                  guidance_scale=3.0, guidance_rescale=0.7)
    images = Pipeline.from_pretrained("runs/fmnist")(8, class_labels=3, classifier="runs/clf",
                                                     classifier_scale=2.0)      # ADM classifier guidance

Classifier-free guidance, Ho & Salimans 2022: `guidance_scale` is the library's s in
D_u + s (D_c - D_u); the paper writes (1 + w) eps_c - w eps_u, so s = 1 + w. s = 1 (w = 0) is the
plain conditional model, s = 0 the unconditional one. The unconditional branch is the null class
(class models) or the empty prompt "" -- or `negative_prompt` -- (text models): the conditions
the model was trained to see when labels/captions were dropped. `guidance_rescale` (phi in
[0, 1], Lin et al. 2024) matches the guided x0's std to the conditional one's; it acts only with
s != 1. A latent-diffusion run samples latents and decodes them with its autoencoder.
"""

from __future__ import annotations

import contextlib

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from difflab.core import cfg as cfg_guidance
from difflab.core.guidance import classifier_guidance
from difflab.core import sample
from difflab.core.sampling import DEFAULT_SAMPLER, SAMPLERS, default_sigmas
from difflab.core.schedules import DiscreteVP
from difflab.core.validation import check_finite_tensor, check_number
from difflab.runfolder import CHECKPOINT_FORMAT, atomic_save_safetensors, read_json, write_json
from difflab.models import TRAINABLE_PREFIX, load_run, load_run_latent_space, load_text_encoder

__all__ = ["Pipeline", "grid_for", "NULL_CLASS", "DTYPES", "resolve_device", "resolve_dtype"]

NULL_CLASS = -1  # the class label of the unconditional model (the networks map it to their null embedding)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    """ "auto" (CUDA when present, else CPU) or a torch device name, checked to exist here."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {str(device)!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested, but this torch has no CUDA device (use cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} requested, but there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested, but MPS is not available here")
    return device


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """fp32 / bf16 / fp16 (or the torch dtype itself)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def grid_for(schedule, steps: int) -> Tensor:
    """The sigma grid difflab uses for `steps` steps of a schedule (`core.sampling.default_sigmas`,
    the benchmarked recipe)."""
    return default_sigmas(schedule, steps)


class Pipeline:
    """A denoiser plus its run config (and text encoder, autoencoder); `__call__` samples images in [-1, 1]."""

    def __init__(self, denoiser, config: dict, text_encoder: torch.nn.Module | None = None, latent_space=None):
        self.denoiser = denoiser
        self.config = config
        self.text_encoder = text_encoder
        self.latent_space = latent_space
        self.dtype = torch.float32  # the networks' compute dtype (`to`): bf16/fp16 run under autocast
        # memory switches (`enable_low_memory`)
        self.attention_slice: int | None = None
        self.vae_slice: int | None = None
        self.offload_text_encoder = False
        if config.get("text_encoder") and text_encoder is None:
            raise ValueError("this run is text-conditional: give its text encoder (Pipeline.from_pretrained does)")
        if config.get("autoencoder") and latent_space is None:
            raise ValueError("this run samples latents: give its LatentSpace (Pipeline.from_pretrained does)")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, weights: str = "ema") -> "Pipeline":
        """A difflab run folder, or a diffusers pipeline folder (model_index.json; the Stable
        Diffusion layout: `difflab.interop.folders`)."""
        from difflab.interop.folders import is_diffusers_folder, load_diffusers_folder

        if is_diffusers_folder(path):
            return cls(*load_diffusers_folder(path))
        config_file = Path(path) / "config.json"
        raw = read_json(config_file) if config_file.is_file() else {}
        adapter = raw.get("adapter") if isinstance(raw, dict) else None  # a damaged file: load_run says so
        if adapter:
            return cls._with_adapter(path, adapter, weights)
        denoiser, config = load_run(path, weights=weights)
        return cls(denoiser, config, load_text_encoder(path, config, weights), load_run_latent_space(path, config))

    @classmethod
    def from_original(cls, path: str | os.PathLike, kind: str, **kwargs) -> "Pipeline":
        """An original checkpoint file in difflab's own networks: kind "adm" (guided-diffusion; kwargs
        are its flags) or "dit" (DiT; kwargs vae=AutoencoderKL folder, num_heads). See
        `difflab.interop.original`."""
        from difflab.interop.original import load_adm, load_dit

        loaders = {"adm": load_adm, "dit": load_dit}
        if kind not in loaders:
            raise ValueError(f"kind must be one of {', '.join(loaders)}, got {kind!r}")
        return cls(*loaders[kind](path, **kwargs))

    @classmethod
    def _with_adapter(cls, path, adapter: dict, weights: str) -> "Pipeline":
        """A LoRA run (`difflab train --finetune lora`) or a Textual Inversion run (`--finetune
        embeddings`): its base pipeline with the run's adapters, or with its new tokens' rows."""
        from difflab.nn.lora import LORA_TARGETS, add_lora, load_lora_state
        from difflab.runfolder import read_run

        base = Path(adapter.get("base", ""))
        if not (base / "config.json").is_file() and not (base / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} holds LoRA adapters for the base {base}, which is not there")
        config, tensors, _ = read_run(path, weights)
        if weights == "raw":
            tensors = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        pipe = cls.from_pretrained(base)
        if adapter.get("kind") == "textual_inversion":
            tokens = list(adapter["tokens"])
            missing = [t for t in tokens if f"token.{t}" not in tensors]
            if missing or pipe.text_encoder is None:
                raise ValueError(f"{path}: no embedding for token(s) {missing} (or its base has no text encoder)")
            ids = pipe.text_encoder.add_tokens(tokens)
            with torch.no_grad():
                for t, i in zip(tokens, ids):
                    pipe.text_encoder.token_embedding.weight[i] = tensors[f"token.{t}"]
            pipe.config = {**pipe.config, "adapter": adapter, "train": config.get("train", {})}
            return pipe
        add_lora(pipe.denoiser.net, int(adapter["rank"]), adapter.get("alpha"), adapter.get("targets") or LORA_TARGETS)
        load_lora_state(pipe.denoiser.net, tensors)
        pipe.denoiser.eval().requires_grad_(False)
        pipe.config = {**pipe.config, "adapter": adapter, "train": config.get("train", {})}
        return pipe

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> "Pipeline":
        """Move every network to `device` ("auto": CUDA when present, else CPU) and set the compute
        dtype ("fp32", "bf16", "fp16" or a torch dtype): the denoiser's and the decoder's weights are
        cast and the networks run under autocast; samplers keep their float32/float64 state."""
        if device is not None:
            device = resolve_device(device)
            self.denoiser.to(device)
            if self.text_encoder is not None and not self.offload_text_encoder:
                self.text_encoder.to(device)
            if self.latent_space is not None:
                self.latent_space.autoencoder.to(device)
        if dtype is not None:
            self.dtype = resolve_dtype(dtype)
            self.denoiser.net.to(self.dtype)
            if self.latent_space is not None:
                self.latent_space.autoencoder.to(self.dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @contextlib.contextmanager
    def autocast(self):
        """The networks' compute context: autocast of the compute dtype (none in fp32) and the
        attention slicing of `enable_low_memory`."""
        from difflab.core.attention import attention_slicing

        with (
            torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32),
            attention_slicing(self.attention_slice),
        ):
            yield

    def enable_low_memory(
        self,
        attention_slice: int | None = 1024,
        vae_slice: int | None = 1,
        vae_tiling: bool = True,
        offload_text_encoder: bool = True,
    ) -> dict:
        """The memory switches people expect for large models; each leaves the images unchanged
        (tested). attention_slice: fused attention over that many queries at a time; vae_slice:
        decode that many latents at a time; vae_tiling: a diffusers VAE decodes in overlapping
        tiles (its own `enable_tiling`; difflab's autoencoders decode whole images, so for them
        it is off); offload_text_encoder: the text encoder stays on the CPU, its states move to
        the denoiser's device. Returns what was switched on."""
        self.attention_slice = attention_slice
        self.vae_slice = vae_slice if self.latent_space is not None else None
        tiling = False
        if vae_tiling and self.latent_space is not None and hasattr(self.latent_space.autoencoder, "enable_tiling"):
            self.latent_space.autoencoder.enable_tiling()
            tiling = True
        self.offload_text_encoder = bool(offload_text_encoder and self.text_encoder is not None)
        if self.offload_text_encoder:
            self.text_encoder.to("cpu")
        return {
            "attention_slice": self.attention_slice,
            "vae_slice": self.vae_slice,
            "vae_tiling": tiling,
            "offload_text_encoder": self.offload_text_encoder,
        }

    def sigmas_for(self, steps: int) -> Tensor:
        """The sampling grid of `steps` steps: a diffusers folder's scheduler spacing (so its results
        match diffusers' pipeline), else difflab's default grid (`grid_for`)."""
        spec = self.config.get("diffusers")
        if spec:
            from difflab.interop.folders import scheduler_sigmas

            return scheduler_sigmas(spec, self.denoiser.schedule, steps)
        return grid_for(self.denoiser.schedule, steps)

    def _start_scale(self, sig: Tensor, steps: int | None) -> float:
        """What unit starting noise is multiplied by: a diffusers folder's scheduler's own factor on
        its grid; else the VP point at the first sigma (sqrt(1 + sigma^2)) or sigma itself."""
        spec = self.config.get("diffusers")
        if spec and steps is not None:
            from difflab.interop.folders import scheduler_start

            return scheduler_start(spec, self.denoiser.schedule, steps)
        s0 = float(sig[0])
        return (1 + s0**2) ** 0.5 if isinstance(self.denoiser.schedule, DiscreteVP) else s0

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        if self.config.get("diffusers"):
            raise ValueError("this pipeline was loaded from a diffusers folder; save it with diffusers")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = dict(self.denoiser.net.state_dict())
        if getattr(self.text_encoder, "trainable", False):
            state.update({TRAINABLE_PREFIX + k: v for k, v in self.text_encoder.state_dict().items()})
        atomic_save_safetensors(state, path / "model.safetensors", metadata={"format": CHECKPOINT_FORMAT})
        if self.latent_space is not None:
            from difflab.nn.autoencoder import save_latent_space

            save_latent_space(self.latent_space, path / self.config["autoencoder"].get("folder", "autoencoder"))
        write_json(path / "config.json", {k: v for k, v in self.config.items() if k != "saved_step"})
        return path

    @property
    def num_classes(self) -> int | None:
        return self.config["model"].get("num_classes")

    @property
    def class_names(self) -> list[str]:
        return self.config.get("data", {}).get("class_names", [])

    @property
    def conditioning(self) -> str:
        """ "text", "class" or "none"."""
        return "text" if self.text_encoder is not None else "class" if self.num_classes is not None else "none"

    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images this pipeline returns."""
        d = self.config["data"]
        return (d["channels"], d["size"], d["size"])

    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the diffusion model samples: the latents of a latent-diffusion run, else images."""
        return tuple(self.latent_space.latent_shape) if self.latent_space is not None else self.image_shape()

    def _labels(self, n: int, class_labels, k: int | None = None) -> Tensor | None:
        """Labels for the network (k: its classes) or for a guiding classifier (k: the classifier's)."""
        if self.conditioning == "text":
            if class_labels is not None:
                raise ValueError(
                    "class_labels given, but this model is text-conditional: pass prompt=... (--prompt) instead"
                )
            return None
        k = self.num_classes if k is None else k
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

    @staticmethod
    def _prompts(n: int, prompt, what: str = "prompt") -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if len(prompts) == 1:
            prompts = prompts * n
        if len(prompts) != n:
            raise ValueError(f"{what} has {len(prompts)} entries for n={n} images")
        return prompts

    def encode_prompts(self, prompts, truncate: bool = False) -> tuple[Tensor, Tensor]:
        """(token states (B, T, dim), key mask (B, T)) of prompts, on the denoiser's device.

        A prompt longer than the encoder takes is a ValueError naming its length and the limit,
        unless `truncate`; a word-level encoder refuses words outside its vocabulary."""
        if self.text_encoder is None:
            raise self._not_text()
        if getattr(self.text_encoder, "trainable", False):
            unknown = self.text_encoder.unknown_words(prompts)
            if unknown:
                raise ValueError(
                    f"words {unknown} are not in this model's vocabulary of "
                    f"{len(self.text_encoder.vocab) - 2} words (it would read them as <unk>)"
                )
        states, mask = self.text_encoder(prompts, truncate)
        device = next(self.denoiser.parameters()).device
        return states.to(device), mask.to(device)

    # ---- prompts -> the network's cond, written once (sampling, editing, guidance all use these) ----

    @property
    def label_dropout(self) -> float:
        """The fraction of labels the run dropped to the null class in training (0: it has no null class)."""
        return float(self.config.get("train", {}).get("label_dropout", 0.0) or 0.0)

    def text_cond(self, prompts, truncate: bool = False) -> dict:
        """{"context", "context_mask"} of a list of prompts (a text-conditional model)."""
        states, mask = self.encode_prompts(prompts, truncate)
        return {"context": states, "context_mask": mask}

    def null_cond(self, why: str | None = None) -> dict:
        """The unconditional model's cond for a batch of 1: the empty prompt's tokens, the null class
        (label -1), or {} for an unconditional model. With `why` (what needs it), a class-conditional
        run trained without label dropout is refused: it never learned its null class."""
        if self.conditioning == "text":
            return self.text_cond([""])
        if self.num_classes is None:
            return {}
        if why is not None and self.label_dropout <= 0:
            if self.config.get("diffusers") or self.config["model"].get("source"):  # not trained by difflab
                raise ValueError(f"{why}, but this model's class embedding has no null class (no label dropout)")
            raise ValueError(f"{why}, but this run was trained without label dropout: it has no null class")
        return {"class_labels": torch.tensor([NULL_CLASS])}

    def _known_classes(self) -> str:
        k = self.num_classes
        names = [str(n) for n in self.class_names]
        return (", ".join(repr(n) for n in names) + " or " if names else "") + f"an index 0..{k - 1}"

    def cond(self, prompt: str | None, flag: str = "prompt") -> dict:
        """The cond (batch 1) of one prompt: text for a text-conditional model; a class name or index
        for a class-conditional one; "" or None is the unconditional model. `flag` names the argument
        in errors (a prompt of an unknown class, a prompt for an unconditional model)."""
        if self.conditioning == "text":
            return self.text_cond([prompt or ""])
        if self.num_classes is None:
            if prompt:
                raise ValueError(f"{flag} {prompt!r}: this run's model is unconditional and takes no prompt")
            return {}
        if prompt is None or not prompt.strip():
            if self.label_dropout <= 0:
                raise ValueError(
                    f"this run was trained without label dropout, so it has no unconditional mode: "
                    f"give {flag} CLASS ({self._known_classes()})"
                )
            return {"class_labels": torch.tensor([NULL_CLASS])}
        text = prompt.strip()
        lowered = [str(n).lower() for n in self.class_names]
        if text.lower() in lowered:
            label = lowered.index(text.lower())
        elif text.isdigit() and int(text) < self.num_classes:
            label = int(text)
        else:
            raise ValueError(f"{flag} {prompt!r} names no class of this run; known: {self._known_classes()}")
        return {"class_labels": torch.tensor([label])}

    def token_ids(self, prompt: str) -> list[int]:
        """The text encoder's token ids of a prompt, padding left out (Prompt-to-Prompt aligns them)."""
        if self.text_encoder is None:
            raise self._not_text()
        out = self.text_encoder.tokenize([prompt])
        ids, mask = (out["input_ids"], out["attention_mask"]) if isinstance(out, dict) else out
        return ids[0][mask[0].bool()].tolist()

    def _not_text(self) -> ValueError:
        hint = ": pass class_labels=... (--label) instead" if self.conditioning == "class" else ""
        return ValueError(f"prompt given, but this model is {self.conditioning}-conditional{hint}")

    def load_classifier(self, folder: str | os.PathLike):
        """A noise-aware classifier folder (`difflab train-classifier`), checked against this model:
        same preconditioning (the classifier sees c_in x and c_noise), image shape and classes."""
        from difflab.nn.classifier import classifier_files, load_classifier, preconditioning_of

        if self.latent_space is not None:
            raise ValueError("classifier guidance works on pixel-space runs; this run samples latents")
        config_path, _ = classifier_files(folder)
        meta = read_json(config_path)
        clf = load_classifier(folder)
        c = clf.config
        if (c.in_channels, c.image_size, c.image_size) != self.image_shape():
            raise ValueError(
                f"classifier {folder} takes {(c.in_channels, c.image_size, c.image_size)} images; "
                f"this model makes {self.image_shape()}"
            )
        theirs = meta.get("preconditioning") or meta.get("info", {}).get("preconditioning")
        mine = preconditioning_of(self.denoiser)
        if theirs is not None and json.dumps(theirs, sort_keys=True) != json.dumps(mine, sort_keys=True):
            raise ValueError(
                f"classifier {folder} was trained on the inputs of prediction={theirs.get('prediction')!r}, "
                f"schedule {theirs.get('schedule', {}).get('kind', theirs.get('schedule'))!r}, "
                f"sigma_data={theirs.get('sigma_data')}; this model has prediction={mine['prediction']!r}, "
                f"schedule {mine['schedule'].get('kind', mine['schedule'])!r}, "
                f"sigma_data={mine['sigma_data']}: train it with `difflab train-classifier --run RUN`"
            )
        if self.num_classes is not None and self.num_classes != c.num_classes:
            raise ValueError(f"classifier {folder} has {c.num_classes} classes, this model {self.num_classes}")
        return clf.to(next(self.denoiser.parameters()).device)

    @torch.no_grad()
    def __call__(
        self,
        n: int = 16,
        *,
        prompt=None,
        negative_prompt=None,
        class_labels=None,
        guidance_scale: float = 1.0,
        guidance_rescale: float = 0.0,
        classifier=None,
        classifier_scale: float = 0.0,
        truncate: bool = False,
        sampler: str = DEFAULT_SAMPLER,
        steps: int = 20,
        seed: int = 0,
        batch_size: int = 64,
        progress: bool = False,
        sigmas: Tensor | None = None,
        latents: Tensor | None = None,
        **sampler_kw,
    ) -> Tensor:
        """Generate n images (n, C, H, W) in [-1, 1].

        prompt / negative_prompt: a string or one per image (text models; no prompt samples the
        empty prompt "", unconditionally). class_labels: an int or one per image (class models;
        default cycles through the classes). guidance_scale: classifier-free guidance s = 1 + w
        (paper's w; s = 1 is none). guidance_rescale: phi in [0, 1]. classifier: a classifier
        folder (or a NoisyClassifier) for ADM classifier guidance with scale `classifier_scale`,
        on a class-conditional or unconditional pixel model. truncate: cut prompts longer than
        the text encoder takes instead of raising. batch_size: images per network call; 64 by
        default because on CPU larger batches lose to page faults (unet-s at 32x32, one thread:
        batch 256 took 2.2x the wall time of batch 64, half of it system time). latents: the
        starting noise (n, *sample_shape()) as diffusers takes it (`latents=`): unit Gaussian,
        scaled here to the grid's first sigma (sqrt(1 + sigma^2) for a VP schedule), instead of
        drawing it from `seed`.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(sorted(SAMPLERS))}")
        check_number("n", n, lo=1, integer=True)
        check_number("steps", steps, lo=1, integer=True)
        check_number("batch_size", batch_size, lo=1, integer=True)
        check_number("seed", seed, lo=0, integer=True)
        check_number("guidance_scale", guidance_scale)
        check_number("guidance_rescale", guidance_rescale, lo=0, hi=1)
        check_number("classifier_scale", classifier_scale)
        text = self.conditioning == "text"
        if not text and (prompt is not None or negative_prompt is not None):
            raise self._not_text()
        guided = guidance_scale != 1.0
        clf = None
        if classifier is not None and classifier_scale != 0:
            if text:
                raise ValueError("classifier guidance needs class labels; this model is text-conditional")
            clf = self.load_classifier(classifier) if isinstance(classifier, (str, os.PathLike)) else classifier
        elif classifier_scale != 0:
            raise ValueError("classifier_scale given without a classifier")
        if text:
            if prompt is None and negative_prompt is None and guided:
                raise ValueError("guidance_scale needs a prompt (or a negative_prompt)")
            prompts = self._prompts(n, "" if prompt is None else prompt)
            negatives = self._prompts(n, "" if negative_prompt is None else negative_prompt, "negative_prompt")
            labels = self._labels(n, class_labels)
        else:
            labels = self._labels(n, class_labels, k=None if clf is None else clf.config.num_classes)
            if guided and self.num_classes is None:
                raise ValueError("guidance_scale needs a class- or text-conditional model")
        sig = self.sigmas_for(steps) if sigmas is None else sigmas
        if latents is not None:
            latents = torch.as_tensor(latents, dtype=torch.float32)
            if tuple(latents.shape) != (n, *self.sample_shape()):
                raise ValueError(f"latents must have shape {(n, *self.sample_shape())}, got {tuple(latents.shape)}")
            check_finite_tensor("latents", latents)
        device = next(self.denoiser.parameters()).device
        if self.latent_space is not None:
            self.latent_space.autoencoder.to(device)
        g = torch.Generator().manual_seed(seed)
        noise_g = torch.Generator().manual_seed(seed + 1)
        out = []
        chunks = range(0, n, batch_size)
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc=f"sample {sampler}", leave=False)
        for a in chunks:
            b = min(n, a + batch_size)
            D, cond = self.denoiser, {}
            if text:
                cond = self.text_cond(prompts[a:b], truncate)
                if guided:
                    D = cfg_guidance(guidance_scale, self.text_cond(negatives[a:b], truncate), guidance_rescale)(D)
            elif labels is not None:
                cond = {"class_labels": labels[a:b].to(device)}
                if guided:
                    why = f"guidance_scale {guidance_scale:g} (classifier-free guidance) needs the null class"
                    D = cfg_guidance(guidance_scale, self.null_cond(why), guidance_rescale)(D)
            if clf is not None:
                from difflab.methods.adm import classifier_log_prob

                D = classifier_guidance(classifier_log_prob(clf, self.denoiser), classifier_scale)(
                    D if self.num_classes is not None else _without_labels(D)
                )
            if latents is not None:  # diffusers' convention: unit noise, scaled as its scheduler does
                x = latents[a:b].to(device) * self._start_scale(sig, steps if sigmas is None else None)
            elif self.config.get("diffusers"):
                noise = torch.randn((b - a, *self.sample_shape()), generator=g).to(device)
                x = noise * self._start_scale(sig, steps if sigmas is None else None)
            else:
                x = torch.randn((b - a, *self.sample_shape()), generator=g).to(device) * float(sig[0])
            with self.autocast():
                x = sample(D, x, sig, method=sampler, cond=cond, noise=noise_g, **sampler_kw).float()
            if self.config.get("diffusers") and float(sig[-1]) > 0 and isinstance(self.denoiser.schedule, DiscreteVP):
                x = x / (1 + float(sig[-1]) ** 2) ** 0.5  # a VP pipeline's output at its last level
            if self.latent_space is not None:
                with self.autocast():
                    step = self.vae_slice or len(x)
                    x = torch.cat([self.latent_space.decode(x[i : i + step]).float() for i in range(0, len(x), step)])
                check_finite_tensor("the decoded images", x, f"(images {a}-{b - 1})")
            out.append(x.cpu())
        return torch.cat(out).clamp(-1, 1)


def _without_labels(denoiser):
    """An unconditional denoiser that ignores the labels meant for a guiding classifier."""
    return lambda x, sigma, class_labels=None, **cond: denoiser(x, sigma, **cond)
