"""The per-item correction's math (gw.merge.correction) on small tensors."""
from __future__ import annotations

import pytest
import torch

from gw.merge.correction import choose_rank, energy_kept, residual, residuals, total_energy_kept


def _pair(out=6, inp=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g, dtype=torch.float64), torch.randn(out, inp, generator=g, dtype=torch.float64)


def test_full_rank_residual_reconstructs_the_item_weight():
    item, merged = _pair()
    res = residual(item, merged, max_rank=99)
    a, b = res.factors(5)
    assert a.shape == (5, 5) and b.shape == (6, 5) and res.max_rank == 5
    torch.testing.assert_close(merged + b @ a, item, atol=1e-12, rtol=0)
    assert res.energy_kept(5) == pytest.approx(1.0)


@pytest.mark.parametrize("rank", [0, 1, 2, 3, 4])
def test_rank_r_error_is_the_tail_of_the_spectrum(rank):
    item, merged = _pair(seed=rank)
    res = residual(item, merged, max_rank=4)
    a, b = res.factors(rank)
    s = torch.linalg.svdvals(item - merged)
    error = torch.linalg.matrix_norm(item - merged - b @ a) ** 2
    assert float(error) == pytest.approx(float(s[rank:].square().sum()), rel=1e-10)
    # Spectral norm of the error is the first dropped singular value (Eckart-Young).
    assert float(torch.linalg.matrix_norm(item - merged - b @ a, ord=2)) == pytest.approx(float(s[rank]), rel=1e-10)
    assert res.energy_kept(rank) == pytest.approx(float(s[:rank].square().sum() / s.square().sum()))


def test_hand_computed_2x2():
    # R = diag(3, 1) (item − merged); rank 1 keeps 3 on the first axis: A = [√3, 0], B = [√3, 0]ᵀ.
    merged = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    item = merged + torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    res = residual(item, merged, max_rank=1)
    a, b = res.factors(1)
    torch.testing.assert_close((b @ a), torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(a.abs(), torch.tensor([[3.0 ** 0.5, 0.0]]))
    torch.testing.assert_close(b.abs(), torch.tensor([[3.0 ** 0.5], [0.0]]))
    assert energy_kept(res.singular_values, 1) == pytest.approx(9 / 10)
    assert a.dtype == torch.float32


def test_zero_residual_and_errors():
    w = torch.ones(3, 4)
    res = residual(w, w.clone(), max_rank=2)
    a, b = res.factors(2)
    assert torch.count_nonzero(b @ a) == 0 and res.energy_kept(0) == 1.0
    with pytest.raises(ValueError, match="2-D weights of one shape"):
        residual(w, torch.ones(4, 3), 2)
    with pytest.raises(ValueError, match="non-finite"):
        residual(w, torch.full((3, 4), float("nan")), 2)
    with pytest.raises(ValueError, match="missing"):
        residuals({"x": w}, {}, ["x"], 2)


def test_total_energy_weighs_each_matrix_by_its_norm():
    big = residual(torch.diag(torch.tensor([4.0, 0.0])), torch.zeros(2, 2), 2)
    small = residual(torch.diag(torch.tensor([1.0, 1.0])), torch.zeros(2, 2), 2)
    # rank 1 keeps 16 of 16 and 1 of 2: (16 + 1) / 18.
    assert total_energy_kept({"a": big, "b": small}, 1) == pytest.approx(17 / 18)


def test_choose_rank_takes_the_best_score_and_the_smallest_rank_among_ties():
    assert choose_rank({0: 0.5, 4: 0.7, 8: 0.7, 16: 0.6}) == 4
    assert choose_rank({16: 0.9, 4: 0.2}) == 16
    # within a tolerance of the best, the smallest rank wins
    assert choose_rank({0: 0.80, 4: 0.94, 8: 0.955, 16: 0.96}, tolerance=0.01) == 8
    assert choose_rank({0: 0.80, 4: 0.94, 8: 0.955, 16: 0.96}, tolerance=0.2) == 0
    with pytest.raises(ValueError, match="tolerance"):
        choose_rank({0: 1.0}, tolerance=-0.1)
    with pytest.raises(ValueError):
        choose_rank({})
