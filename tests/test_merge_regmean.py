"""RegMean (gw.merge.regmean): the closed form is the least-squares merge, checked against a direct solve."""
import pytest
import torch

from gw.merge import merge, needs_grams
from gw.merge.regmean import regmean_matrix


def _layer_inputs(n_models=3, tokens=40, d_in=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, d_in, generator=g, dtype=torch.float64) for _ in range(n_models)]


def test_alpha_one_equals_the_direct_least_squares_solve_of_all_members_outputs():
    xs = _layer_inputs()
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in xs]
    merged = regmean_matrix(weights, [x.T @ x for x in xs], alpha=1.0)
    # min over W of Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²: one stacked least-squares problem
    direct = torch.linalg.lstsq(torch.cat(xs), torch.cat([x @ w.T for x, w in zip(xs, weights)])).solution.T
    torch.testing.assert_close(merged, direct, rtol=1e-6, atol=1e-6)
    # and it is the best possible: any perturbation raises the members' total output error
    loss = lambda w: sum(float(((x @ w.T - x @ wi.T) ** 2).sum()) for x, wi in zip(xs, weights))  # noqa: E731
    assert loss(merged) < loss(merged + 1e-3 * torch.randn(4, 5, generator=g, dtype=torch.float64))


def test_a_hand_computed_case():
    # one input feature: the merge is the Gram-weighted mean, (2·1 + 6·3) / (2 + 6) = 2.5
    merged = regmean_matrix([torch.tensor([[1.0]]), torch.tensor([[3.0]])], [torch.tensor([[2.0]]), torch.tensor([[6.0]])],
                            alpha=0.9)
    assert float(merged) == pytest.approx(2.5, rel=1e-5)
    # alpha = 0 keeps only the diagonals: each input column is a weighted mean of the members' columns
    w1, w2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 4.0]])
    g1, g2 = torch.tensor([[1.0, 5.0], [5.0, 3.0]]), torch.tensor([[3.0, -5.0], [-5.0, 1.0]])
    merged = regmean_matrix([w1, w2], [g1, g2], alpha=0.0)
    torch.testing.assert_close(merged.float(), torch.tensor([[(1 * 1 + 3 * 3) / 4, (0 * 3 + 4 * 1) / 4]]), rtol=1e-5,
                               atol=1e-5)


def test_identical_members_are_returned_and_a_direction_nobody_saw_gets_the_mean():
    w = torch.randn(3, 4, dtype=torch.float64)
    x = _layer_inputs(1)[0][:, :4]
    torch.testing.assert_close(regmean_matrix([w, w], [x.T @ x, 2 * x.T @ x], 0.9), w)
    # input feature 3 never active for anyone: its column is the members' mean there, not a blow-up
    x[:, 3] = 0
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    merged = regmean_matrix([a, b], [x.T @ x, x.T @ x], 1.0)
    torch.testing.assert_close(merged[:, 3], (a[:, 3] + b[:, 3]) / 2, rtol=1e-4, atol=1e-4)


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"encoder.dense.weight": torch.randn(4, 3, generator=g), "encoder.dense.bias": torch.randn(4, generator=g),
            "encoder.LayerNorm.weight": torch.randn(4, generator=g), "embeddings.position_ids": torch.arange(4)}


def test_the_registered_method_merges_matrices_in_closed_form_and_averages_the_rest():
    base, models = _state(0), [_state(1), _state(2)]
    xs = _layer_inputs(2, d_in=3)
    grams = [{"encoder.dense.weight": (x.T @ x / len(x)).float()} for x in xs]
    assert needs_grams("regmean") and not needs_grams("ties")
    result = merge("regmean", base, models, grams=grams, alpha=0.9)
    expected = regmean_matrix([m["encoder.dense.weight"] for m in models], [g["encoder.dense.weight"] for g in grams], 0.9)
    torch.testing.assert_close(result.state_dict["encoder.dense.weight"], expected.float())
    for key in ("encoder.dense.bias", "encoder.LayerNorm.weight"):
        torch.testing.assert_close(result.state_dict[key], (models[0][key] + models[1][key]) / 2)
    assert torch.equal(result.state_dict["embeddings.position_ids"], base["embeddings.position_ids"])
    assert result.params == {"alpha": 0.9} and result.info == {"closed_form_keys": 1, "mean_keys": 2}


def test_regmean_errors_name_what_is_missing_or_wrong():
    base, models = _state(0), [_state(1), _state(2)]
    with pytest.raises(ValueError, match="one set of input Gram matrices per model"):
        merge("regmean", base, models)
    with pytest.raises(ValueError, match=r"Gram for 'encoder.dense.weight' of model 1 has shape \(2, 2\)"):
        merge("regmean", base, models, grams=[{"encoder.dense.weight": torch.eye(3)},
                                             {"encoder.dense.weight": torch.eye(2)}])
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        merge("regmean", base, models, grams=[{}, {}], alpha=1.5)
