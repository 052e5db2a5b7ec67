"""difflab.metrics.subject: DreamBooth's SIM / DIV and the Gini-Simpson diversity, exact answers."""

import pytest
import torch

from difflab.metrics.subject import gini_simpson, pairwise_distance, subject_similarity


def test_gini_simpson_exact():
    assert gini_simpson(torch.arange(6).repeat(5), 6) == pytest.approx(1 - 1 / 6)
    assert gini_simpson(torch.zeros(7, dtype=torch.long), 6) == 0.0
    assert gini_simpson(torch.tensor([0, 0, 1, 1]), 6) == pytest.approx(0.5)


def test_pairwise_distance_exact():
    e = torch.eye(3) * torch.tensor([[2.0], [1.0], [5.0]])  # orthogonal rows, any norm: every pair at 1
    assert pairwise_distance(e) == pytest.approx(1.0)
    assert pairwise_distance(e[[0, 0, 0]]) == pytest.approx(0.0)
    # two opposite rows and one orthogonal: pairs (0,1) at 2, (0,2) and (1,2) at 1 -> mean 4/3
    f = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0]])
    assert pairwise_distance(f) == pytest.approx(4 / 3)


def test_subject_similarity_exact_and_bad_input():
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    f = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    assert torch.allclose(subject_similarity(f, ref), torch.tensor([0.5, 2**-0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        subject_similarity(torch.zeros(3), ref)
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_distance(torch.ones(1, 4))
