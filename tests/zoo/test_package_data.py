"""A wheel of difflab carries its checkpoints: the zoo, the metric classifiers and the image-text
model load from an installed copy, away from the repository (importlib.resources, difflab.assets)."""

import subprocess
import sys
from pathlib import Path

from difflab import zoo
from tests.train.helpers import REPO, subprocess_env

CHECK = """
import sys, torch, difflab
from difflab import zoo
from difflab.metrics.classifiers import load_classifier
from difflab.train.clip import load_clip
from difflab.assets import asset
assert difflab.__file__.startswith(sys.argv[1]), difflab.__file__
print(",".join(zoo.names()))
x = zoo.load("digits-unet-s")(2, steps=2, seed=0)
assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()
for name in ("digits", "fmnist", "shapes"):
    load_classifier(name)
load_clip(asset("clip", "shapes"))
"""


def test_an_installed_wheel_finds_the_zoo_and_classifiers(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-w", str(wheels)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = wheels.glob("difflab-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300, capture_output=True
    )
    env = {**subprocess_env(), "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", CHECK, str(site)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().split(",") == zoo.names()
    assert Path(zoo.ZOO_DIR).resolve() == (REPO / "difflab" / "checkpoints" / "zoo").resolve()
