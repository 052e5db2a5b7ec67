"""Embeddings: sinusoidal and Fourier noise-level features, label table with a null class."""

import math

import pytest
import torch

from difflab.nn.embeddings import (
    FourierFeatures,
    LabelEmbedder,
    TimestepEmbedder,
    drop_labels,
    timestep_embedding,
)


def test_timestep_embedding_matches_the_formula():
    t = torch.tensor([0.0, 3.0, 999.0, 0.25])
    emb = timestep_embedding(t, 8, max_period=10000)
    assert emb.shape == (4, 8)
    freqs = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    assert torch.allclose(emb, expected, atol=1e-5)
    odd = timestep_embedding(t, 9)
    assert odd.shape == (4, 9) and torch.equal(odd[:, :8], emb) and not odd[:, 8].any()


def test_timestep_embedder_time_scale_and_fourier():
    positional = TimestepEmbedder(16, 8, time_scale=1000.0)
    t = torch.tensor([0.1, 0.2])
    features = timestep_embedding(t * 1000.0, 8)
    assert torch.allclose(positional(t), positional.mlp(features))
    fourier = TimestepEmbedder(16, 8, kind="fourier", fourier_scale=2.0)
    freqs = fourier.fourier.freqs
    args = 2 * math.pi * t[:, None] * freqs[None]
    assert torch.allclose(fourier.fourier(t), torch.cat([args.cos(), args.sin()], 1))
    assert "fourier.freqs" in fourier.state_dict()
    assert torch.equal(FourierFeatures(8, 2.0).freqs, freqs)  # seeded: same model, same features
    with pytest.raises(ValueError, match="'gaussian'"):
        TimestepEmbedder(16, kind="gaussian")


def test_label_embedder_null_class_and_errors():
    embed = LabelEmbedder(num_classes=3, dim=4).eval()
    null_row = embed.embedding_table.weight[3]
    out = embed(torch.tensor([0, -1, 3, 2]), 4)
    assert torch.equal(out[1], null_row) and torch.equal(out[2], null_row)
    assert torch.equal(out[0], embed.embedding_table.weight[0])
    assert torch.equal(embed(None, 2), null_row.expand(2, 4))
    with pytest.raises(ValueError, match="class label 4"):
        embed(torch.tensor([4]), 1)
    with pytest.raises(ValueError, match="class label -2"):
        embed(torch.tensor([-2]), 1)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        embed(torch.tensor([0, 1, 2]), 2)
    with pytest.raises(ValueError, match="float32"):
        embed(torch.tensor([0.0]), 1)


def test_label_embedder_dropout_only_in_training():
    embed = LabelEmbedder(num_classes=3, dim=4, dropout_prob=1.0)
    labels = torch.tensor([0, 1, 2])
    null_rows = embed.embedding_table.weight[3].expand(3, 4)
    assert torch.equal(embed.train()(labels, 3), null_rows)
    assert not torch.equal(embed.eval()(labels, 3), null_rows)


def test_drop_labels():
    labels = torch.arange(1000) % 7
    assert torch.equal(drop_labels(labels, 0.0), labels)
    assert (drop_labels(labels, 1.0) == -1).all()
    a = drop_labels(labels, 0.3, torch.Generator().manual_seed(1))
    b = drop_labels(labels, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    dropped = (a == -1).float().mean().item()
    assert 0.25 < dropped < 0.35
    assert torch.equal(a[a != -1], labels[a != -1])
    with pytest.raises(ValueError, match="1.5"):
        drop_labels(labels, 1.5)
