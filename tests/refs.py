"""Reference implementations for equivalence tests: diffusers and k-diffusion (test-only deps).

k-diffusion's package __init__ imports torchvision, clip and wandb, none of which install beside
the CPU torch here; its `sampling.py` needs only `utils.append_dims`, so it is loaded by file
path under a stub package.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest


def k_sampling():
    """k_diffusion.sampling, or skip with the reason when k-diffusion is not installed."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (make test installs it with --no-deps)")
    root = list(spec.submodule_search_locations)[0]
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [root]
    utils = types.ModuleType("k_diffusion.utils")

    def append_dims(x, target_dims):
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    pkg.utils = utils
    sys.modules["k_diffusion"] = pkg
    sys.modules["k_diffusion.utils"] = utils
    sspec = importlib.util.spec_from_file_location("k_diffusion.sampling", f"{root}/sampling.py")
    mod = importlib.util.module_from_spec(sspec)
    sys.modules["k_diffusion.sampling"] = mod
    sspec.loader.exec_module(mod)
    return mod


def diffusers_schedulers():
    return pytest.importorskip("diffusers", reason="diffusers is a test-only reference dependency")
