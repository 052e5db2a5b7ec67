"""Train text-to-image models on a machine that lacks the MiniLM weights (a lent GPU: nothing can
be fetched there, and the 88 MB weights do not fit the 64 MiB that travels with the tree).

The frozen MiniLM only ever fills the training loop's caption table (difflab/train/conditioning.py):
one row of token states per distinct caption. So the states are computed here, once, and stored
(fp16, each caption trimmed to its real tokens); on the GPU machine a stand-in encoder serves them
and the run folder records the ordinary {"kind": "minilm"} text encoder, so sampling anywhere else
loads the real MiniLM. Rows differ from MiniLM's by fp16 rounding (relative ~1e-3) only.

    python bench/gpu_text_states.py export --data shapes --config checkpoints/recipes/shapes-text-unet.json \
        --out .gpu/shapes-states.safetensors
    python bench/gpu_text_states.py run .gpu/shapes-states.safetensors -- train --config C --out RUN ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _captions(data: str, data_kwargs: dict) -> list[str]:
    from difflab.data import load_dataset

    caps = load_dataset(data, split="train", **data_kwargs).captions
    if caps is None:
        raise SystemExit(f"dataset {data!r} has no captions")
    return sorted(set(caps))


def export(prompts: list[str], out: Path, max_length: int = 77, chunk: int = 256) -> dict:
    from difflab.nn.text import MiniLMEncoder

    enc = MiniLMEncoder(max_length=max_length)
    prompts = [*prompts, ""] if "" not in prompts else list(prompts)
    rows, lengths = [], []
    for i in range(0, len(prompts), chunk):
        states, mask = enc(prompts[i : i + chunk])
        for s, m in zip(states, mask):
            n = int(m.sum())
            rows.append(s[:n])
            lengths.append(n)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"states": torch.cat(rows).half().contiguous(), "lengths": torch.tensor(lengths)},
        str(out),
        metadata={"prompts": json.dumps(prompts), "max_length": str(max_length)},
    )
    return {"prompts": len(prompts), "tokens": int(sum(lengths)), "bytes": out.stat().st_size}


class StoredMiniLM(nn.Module):
    """Serves stored MiniLM token states for the prompts it was exported with; nothing else."""

    dim = 384
    trainable = False

    def __init__(self, path: str | Path):
        super().__init__()
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        t = load_file(str(path))
        self.max_length = int(meta["max_length"])
        prompts = json.loads(meta["prompts"])
        self.rows = dict(zip(prompts, torch.split(t["states"].float(), t["lengths"].tolist())))

    def config_dict(self) -> dict:
        return {"kind": "minilm", "max_length": self.max_length}

    def forward(self, prompts) -> tuple[Tensor, Tensor]:
        missing = [p for p in prompts if p not in self.rows]
        if missing:
            raise KeyError(f"no stored states for prompt {missing[0]!r} ({len(missing)} missing); export them")
        T = max(self.rows[p].shape[0] for p in prompts)
        states = torch.zeros(len(prompts), T, self.dim)
        mask = torch.zeros(len(prompts), T, dtype=torch.bool)
        for i, p in enumerate(prompts):
            n = self.rows[p].shape[0]
            states[i, :n], mask[i, :n] = self.rows[p], True
        return states, mask


def use_stored(path: str | Path) -> None:
    """Make the training loop's frozen MiniLM the stored states of `path`."""
    from difflab.train import conditioning

    enc = StoredMiniLM(path)

    def frozen(max_length: int) -> StoredMiniLM:
        if max_length != enc.max_length:
            raise ValueError(f"states were exported at max_length {enc.max_length}, run asks {max_length}")
        return enc

    conditioning._frozen_minilm = frozen


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        if len(argv) < 3 or argv[2] != "--":
            raise SystemExit("usage: gpu_text_states.py run STATES -- DIFFLAB-ARGS...")
        use_stored(argv[1])
        from difflab.cli import main as difflab_main

        return difflab_main(argv[3:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="store MiniLM states of a data set's distinct captions")
    e.add_argument("--data", default="shapes")
    e.add_argument("--config", help="a recipe/TrainConfig JSON whose data_kwargs to use")
    e.add_argument("--out", type=Path, required=True)
    sub.add_parser("run", help="run a difflab command with the stored states: run STATES -- ARGS")
    a = p.parse_args(argv)
    kwargs = json.loads(Path(a.config).read_text()).get("data_kwargs", {}) if a.config else {}
    print(json.dumps(export(_captions(a.data, kwargs), a.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
