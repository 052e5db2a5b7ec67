"""Files shipped inside the difflab package: the model zoo, the metric classifiers, the small
image-text model and the training recipes, under difflab/checkpoints/ (package data, so a wheel
install has them; the repository's checkpoints/ is a link to the same folder).

    from difflab.assets import asset
    asset("zoo", "fmnist-unet-s")          # Path of a zoo model folder
    asset("classifiers")                    # the metric classifiers
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

__all__ = ["ASSETS_DIR", "asset", "resolve_run"]


def _assets_dir() -> Path:
    root = files("difflab") / "checkpoints"
    if not isinstance(root, Path):  # a zipped install: resources are not plain files
        raise RuntimeError(f"difflab's checkpoints are not on the file system ({root!r}); install difflab unzipped")
    return root


ASSETS_DIR = _assets_dir()


def asset(*parts: str) -> Path:
    """A path under the package's checkpoints/ folder (it may not exist: callers say what is missing)."""
    return ASSETS_DIR.joinpath(*parts)


def resolve_run(name_or_path: str | os.PathLike) -> Path:
    """A folder as given, or the zoo model of that name when no such folder exists (every command
    that takes a run folder also takes a zoo name)."""
    path = Path(name_or_path)
    zoo = asset("zoo", str(name_or_path))
    if not path.exists() and (zoo / "config.json").is_file():
        return zoo
    return path
