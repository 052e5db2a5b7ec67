"""LoRA adapters (Hu et al. 2021) on a denoising network's attention projections, through peft.

    add_lora(net, rank=4)                 # W x  ->  W x + (alpha / r) B A x, B = 0 at the start
    state = lora_state(net)               # the adapter tensors only ("...to_q.lora_A.weight", ...)
    load_lora_state(net, state)           # onto a freshly built base network

The targets are the q, k, v and output projections of every attention layer: difflab's own
`Attention` (to_q, to_k, to_v, to_out) and diffusers' (to_q, to_k, to_v, to_out.0), so one adapter
code path serves difflab's UNet and DiT and a wrapped diffusers UNet. peft's `inject_adapter_in_model`
fits here because it works on any nn.Module (no PeftModel wrapper around the denoiser, whose call
signature difflab's samplers rely on) and marks only the adapter weights trainable.
"""

from __future__ import annotations

import re

from torch import Tensor, nn

__all__ = ["LORA_TARGETS", "add_lora", "lora_state", "load_lora_state", "has_lora", "lora_parameter_count"]

LORA_TARGETS = r".*\.(to_q|to_k|to_v|to_out|to_out\.0)$"


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ValueError(f"LoRA needs peft (pip install peft==0.21.2, in requirements.lock): {e}") from None
    return peft


def add_lora(net: nn.Module, rank: int = 4, alpha: float | None = None, targets: str = LORA_TARGETS) -> nn.Module:
    """Inject rank-`rank` LoRA adapters (scale alpha / rank; alpha defaults to rank) into `net` in
    place; every other weight is frozen. Returns `net`."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    peft = _peft()
    names = _linear_targets(net, targets)  # Linear layers only: diffusers' to_out is a ModuleList around one
    if not names:
        raise ValueError("no attention projection of this network matched the LoRA targets")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=names)
    peft.inject_adapter_in_model(config, net)
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name)
    net.lora_config = {"rank": rank, "alpha": float(config.lora_alpha), "targets": targets}
    return net


def has_lora(net: nn.Module) -> bool:
    return getattr(net, "lora_config", None) is not None


def lora_state(net: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors of `net` (names without peft's adapter name)."""
    return dict(_peft().get_peft_model_state_dict(net))


def load_lora_state(net: nn.Module, state: dict[str, Tensor]) -> None:
    """Load adapter tensors into a network that `add_lora` prepared; every tensor must land."""
    own = lora_state(net)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"LoRA adapter does not fit this network: {len(missing)} missing {missing[:2]}, "
            f"{len(unexpected)} unexpected {unexpected[:2]}"
        )
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(f"LoRA tensor {k} has shape {tuple(v.shape)}, the network's {tuple(own[k].shape)}")
    _peft().set_peft_model_state_dict(net, state)


def _linear_targets(net: nn.Module, targets: str) -> list[str]:
    """Full names of the nn.Linear layers whose name the `targets` pattern matches."""
    pattern = re.compile(targets)
    return [name for name, m in net.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(name)]


def lora_parameter_count(net: nn.Module, rank: int, targets: str = LORA_TARGETS) -> int:
    """r (in + out) summed over the Linear layers the targets match: what `add_lora` adds."""
    layers = dict(net.named_modules())
    return sum(rank * (layers[n].in_features + layers[n].out_features) for n in _linear_targets(net, targets))
