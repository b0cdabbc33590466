"""Merge methods (gw.merge): hand-worked TIES, DARE in expectation, DOGE's claims, identities, errors."""
from __future__ import annotations

import json
import math

import pytest
import torch

from gw.merge import available_methods, classify_key, merge, method_defaults
from gw.merge._magnitude import kept_count, top_fraction_thresholds
from gw.merge._state import TaskVectorSource
from gw.merge.doge import doge_lambdas, doge_residuals, loss_gradient, optimise_shift, shared_subspace_basis

HIDDEN, INTERMEDIATE, VOCAB, LAYERS = 16, 24, 40, 2


def method_inputs(method, base, n_models, *, steps):
    """What a method needs besides the models: DOGE a short run, RegMean a Gram per matrix and model."""
    from gw.merge import classify_key, needs_grams

    if method == "doge":
        return {"steps": steps}
    if needs_grams(method):
        eye = {k: torch.eye(v.shape[1]) for k, v in base.items() if classify_key(k, v) == "matrix"}
        return {"grams": [eye] * n_models}
    return {}


def bert_like(seed: int, *, prefix: str = "", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A BertModel-shaped backbone state dict (no pooler: the pooler belongs to the head)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "embeddings.word_embeddings.weight": (VOCAB, HIDDEN),
        "embeddings.position_embeddings.weight": (12, HIDDEN),
        "embeddings.token_type_embeddings.weight": (2, HIDDEN),
        "embeddings.LayerNorm.weight": (HIDDEN,),
        "embeddings.LayerNorm.bias": (HIDDEN,),
    }
    for layer in range(LAYERS):
        p = f"encoder.layer.{layer}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + name + ".weight"] = (HIDDEN, HIDDEN)
            shapes[p + name + ".bias"] = (HIDDEN,)
        shapes[p + "attention.output.LayerNorm.weight"] = (HIDDEN,)
        shapes[p + "attention.output.LayerNorm.bias"] = (HIDDEN,)
        shapes[p + "intermediate.dense.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[p + "intermediate.dense.bias"] = (INTERMEDIATE,)
        shapes[p + "output.dense.weight"] = (HIDDEN, INTERMEDIATE)
        shapes[p + "output.dense.bias"] = (HIDDEN,)
        shapes[p + "output.LayerNorm.weight"] = (HIDDEN,)
        shapes[p + "output.LayerNorm.bias"] = (HIDDEN,)
    return {prefix + k: torch.randn(s, generator=generator).to(dtype) for k, s in shapes.items()}


def finetune(base: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator).to(v.dtype) for k, v in base.items()}


@pytest.fixture(scope="module")
def trio():
    base = bert_like(0)
    return base, [finetune(base, i) for i in range(3)]


def assert_state_close(actual, expected, atol=1e-6):
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].shape == expected[key].shape, key
        assert actual[key].dtype == expected[key].dtype, key
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=1e-5, msg=key)


# ---- TIES -----------------------------------------------------------------------------------------

TIES_TAUS = [
    [3.0, -2.0, 0.5, 1.0, -4.0, 0.1],
    [-1.0, -3.0, 2.0, 0.2, 5.0, 0.3],
    [2.0, 1.0, -0.4, -6.0, 0.7, 0.2],
]
# Keep 3 of 6 per task: τ1 -> [3, -2, 0, 0, -4, 0], τ2 -> [0, -3, 2, 0, 5, 0], τ3 -> [2, 1, 0, -6, 0, 0].
# Elected signs (sum): [+5, -4, +2, -6, +1, 0]; disjoint means of the agreeing entries:
TIES_EXPECTED = [2.5, -2.5, 2.0, -6.0, 5.0, 0.0]


def test_ties_hand_worked_example():
    key = "encoder.layer.0.output.dense.bias"
    base = {key: torch.ones(6)}
    models = [{key: base[key] + torch.tensor(t)} for t in TIES_TAUS]
    result = merge("ties", base, models, top_k=0.5, lam=1.0)
    torch.testing.assert_close(result.state_dict[key], 1.0 + torch.tensor(TIES_EXPECTED))
    assert result.params == {"lam": 1.0, "top_k": 0.5}
    assert result.info["kept_per_task"] == 3
    assert result.info["trim_thresholds"] == pytest.approx([2.0, 2.0, 1.0])
    scaled = merge("ties", base, models, top_k=0.5, lam=0.5)
    torch.testing.assert_close(scaled.state_dict[key], 1.0 + 0.5 * torch.tensor(TIES_EXPECTED))


def test_ties_threshold_is_over_the_whole_task_vector_not_per_key():
    # The same six entries split over two keys (a LayerNorm weight and a bias) merge identically.
    keys = ("encoder.layer.0.output.LayerNorm.weight", "encoder.layer.0.output.dense.bias")
    base = {keys[0]: torch.zeros(2), keys[1]: torch.zeros(4)}
    models = [{keys[0]: torch.tensor(t[:2]), keys[1]: torch.tensor(t[2:])} for t in TIES_TAUS]
    merged = merge("ties", base, models, top_k=0.5).state_dict
    torch.testing.assert_close(torch.cat([merged[keys[0]], merged[keys[1]]]), torch.tensor(TIES_EXPECTED))


@pytest.mark.parametrize("fraction", [0.2, 0.37, 1.0])
def test_exact_thresholds_match_kthvalue_across_chunks_and_ties(fraction):
    generator = torch.Generator().manual_seed(3)
    base = {"a.weight": torch.zeros(50, 7), "b.bias": torch.zeros(33)}
    models = []
    for _ in range(3):
        model = {k: torch.randn(v.shape, generator=generator) for k, v in base.items()}
        model["b.bias"][:10] = 0.5  # ties, possibly at the threshold
        models.append(model)
    source = TaskVectorSource(base, models, chunk=16)  # many chunks, split inside keys
    keys = list(base)
    numel = source.numel(keys)
    thresholds = top_fraction_thresholds(lambda: source.chunks(keys), 3, numel, fraction)
    k = kept_count(fraction, numel)
    for task, model in enumerate(models):
        magnitudes = torch.cat([model[key].abs().reshape(-1) for key in keys])
        expected = 0.0 if k >= numel else float(torch.kthvalue(magnitudes, numel - k + 1).values)
        assert float(thresholds[task]) == expected
        assert int((magnitudes >= thresholds[task]).sum()) >= k


def test_ties_rejects_non_finite_task_vectors_naming_the_key(trio):
    base, models = trio
    broken = dict(models[1])
    broken["encoder.layer.1.output.dense.weight"] = broken["encoder.layer.1.output.dense.weight"].clone()
    broken["encoder.layer.1.output.dense.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="encoder.layer.1.output.dense.weight"):
        merge("ties", base, [models[0], broken])


# ---- DARE -----------------------------------------------------------------------------------------


def test_dare_drops_and_rescales_and_is_unbiased_over_seeds():
    key = "encoder.layer.0.attention.self.query.weight"
    generator = torch.Generator().manual_seed(5)
    base = {key: torch.randn(20, 10, generator=generator)}
    tau = torch.randn(20, 10, generator=generator)
    model = {key: base[key] + tau}
    p = 0.5
    single = merge("dare", base, [model], p=p, seed=1).state_dict[key] - base[key]
    kept = single.abs() > 1e-6
    torch.testing.assert_close(single[kept], tau[kept] / (1 - p))
    assert 0.3 < kept.float().mean().item() < 0.7
    runs = 300
    mean = sum(merge("dare", base, [model], p=p, seed=s).state_dict[key] for s in range(runs)) / runs
    relative_error = torch.linalg.norm(mean - base[key] - tau) / torch.linalg.norm(tau)
    assert relative_error < 4 / math.sqrt(runs)  # the estimator's relative std is 1/sqrt(runs)


def test_dare_seeds_are_deterministic_and_distinct(trio):
    base, models = trio
    first = merge("dare", base, models, p=0.3, combine="ties", seed=7)
    again = merge("dare", base, models, p=0.3, combine="ties", seed=7)
    other = merge("dare", base, models, p=0.3, combine="ties", seed=8)
    assert all(torch.equal(first.state_dict[k], again.state_dict[k]) for k in base)
    assert any(not torch.equal(first.state_dict[k], other.state_dict[k]) for k in base)
    assert first.params == {"p": 0.3, "combine": "ties", "lam": 1.0, "top_k": 0.2}


def test_dare_with_p_zero_is_its_combiner(trio):
    base, models = trio
    assert_state_close(merge("dare", base, models, p=0.0).state_dict, merge("ta", base, models).state_dict)
    assert_state_close(
        merge("dare", base, models, p=0.0, combine="ties", lam=1.2).state_dict,
        merge("ties", base, models, lam=1.2).state_dict,
    )


# ---- DOGE -----------------------------------------------------------------------------------------


def test_doge_closed_form_gradient_matches_autograd():
    generator = torch.Generator().manual_seed(11)
    taus = torch.randn(3, 2, 9, 7, generator=generator, dtype=torch.float64)
    lambdas = torch.rand(3, 2, generator=generator, dtype=torch.float64)
    delta = torch.randn(2, 9, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    doge_residuals(taus, lambdas, delta).square().sum().backward()
    closed_form = loss_gradient(taus, lambdas, doge_residuals(taus, lambdas, delta.detach()))
    torch.testing.assert_close(closed_form, delta.grad)


def test_doge_lambda_follows_eta_over_frobenius_norm():
    taus = torch.zeros(2, 2, 4, 3)
    taus[0, 0, 0, 0], taus[1, 0] = 2.0, 1.0
    lambdas = doge_lambdas(taus, 0.07)
    torch.testing.assert_close(lambdas, torch.tensor([[0.035, 0.0], [0.07 / math.sqrt(12), 0.0]]))


def test_doge_shared_subspace_is_orthonormal_with_the_specified_rank():
    generator = torch.Generator().manual_seed(2)
    taus = torch.randn(3, 4, 30, 24, generator=generator)
    basis = shared_subspace_basis(taus, divisor=6)
    assert basis.shape == (4, 30, 24 // 6)
    torch.testing.assert_close(basis.transpose(1, 2) @ basis, torch.eye(4).expand(4, 4, 4), atol=1e-5, rtol=0)
    # Every basis vector lies in the span of the tasks' top ⌊r/N⌋ left singular vectors.
    tops = torch.cat([torch.linalg.svd(taus[t], full_matrices=False).U[..., : 24 // 3] for t in range(3)], -1)
    q = torch.linalg.qr(tops).Q
    torch.testing.assert_close(q @ (q.transpose(1, 2) @ basis), basis, atol=1e-4, rtol=0)


@pytest.mark.parametrize("projection", ["final", "step"])
def test_doge_loss_falls_and_the_update_avoids_the_shared_subspace(projection):
    generator = torch.Generator().manual_seed(4)
    taus = torch.randn(3, 2, 24, 18, generator=generator)
    shift = optimise_shift(taus, steps=60, lr=1e-2, projection=projection)
    assert shift.losses[-1] < shift.losses[0]
    inside = shift.basis @ (shift.basis.transpose(1, 2) @ shift.delta)
    assert torch.linalg.norm(shift.delta) > 0
    assert torch.linalg.norm(inside) <= 1e-5 * torch.linalg.norm(shift.delta)


def test_doge_reference_projection_leaks_into_the_subspace():
    # Why "final"/"step" exist: Adam's per-entry scaling moves the reference's Δ into the subspace.
    generator = torch.Generator().manual_seed(4)
    taus = torch.randn(3, 2, 24, 18, generator=generator)
    shift = optimise_shift(taus, steps=60, lr=1e-2, projection="gradient")
    inside = shift.basis @ (shift.basis.transpose(1, 2) @ shift.delta)
    assert torch.linalg.norm(inside) > 1e-3 * torch.linalg.norm(shift.delta)


def test_doge_merge_formula_without_optimisation(trio):
    base, models = trio
    eta = 0.05
    result = merge("doge", base, models, eta=eta, steps=0, top_k=1.0)
    for key in base:
        taus = [m[key] - base[key] for m in models]
        if classify_key(key, base[key]) == "matrix":
            lambdas = [eta / torch.linalg.norm(t) for t in taus]
            expected = base[key] + sum(lam * t for lam, t in zip(lambdas, taus))
            assert result.info["lambdas"][key] == pytest.approx([float(x) for x in lambdas], rel=1e-5)
        else:  # LayerNorm, biases, embeddings: Task Arithmetic with rest_lam = 1/N
            expected = base[key] + sum(taus) / 3
        torch.testing.assert_close(result.state_dict[key], expected, atol=1e-6, rtol=1e-5, msg=key)
    assert result.info["n_doge_keys"] == 6 * LAYERS
    assert result.params["rest_lam"] == pytest.approx(1 / 3)


def test_doge_end_to_end_loss_falls_and_is_deterministic(trio):
    base, models = trio
    first = merge("doge", base, models, steps=25, lr=1e-3)
    again = merge("doge", base, models, steps=25, lr=1e-3)
    curve = first.info["loss_curve"]
    assert len(curve) == 26 and curve[-1] < curve[0]
    assert all(torch.equal(first.state_dict[k], again.state_dict[k]) for k in base)
    json.dumps(first.record())


def test_doge_batched_weights_match_weights_merged_alone(trio):
    base, models = trio
    keys = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.1.attention.self.key.weight"]
    together = merge("doge", {k: base[k] for k in keys}, [{k: m[k] for k in keys} for m in models],
                     steps=20, lr=1e-3, top_k=1.0).state_dict
    for key in keys:
        alone = merge("doge", {key: base[key]}, [{key: m[key]} for m in models], steps=20, lr=1e-3, top_k=1.0)
        torch.testing.assert_close(together[key], alone.state_dict[key], atol=1e-6, rtol=1e-5)


def test_doge_without_optimisation_returns_the_model_from_copies_when_lambdas_sum_to_one():
    # N copies, Δ = 0, no mask: θ₀ + N·(η/‖τ‖_F)·τ, which is θ₁ exactly when η = ‖τ‖_F / N.
    key = "encoder.layer.0.attention.self.query.weight"
    generator = torch.Generator().manual_seed(8)
    base = {key: torch.randn(10, 8, generator=generator)}
    model = {key: base[key] + torch.randn(10, 8, generator=generator)}
    eta = float(torch.linalg.norm(model[key] - base[key])) / 3
    merged = merge("doge", base, [model] * 3, eta=eta, steps=0, top_k=1.0).state_dict
    torch.testing.assert_close(merged[key], model[key])


# ---- identities, determinism, scope ---------------------------------------------------------------


def test_merging_copies_of_one_model_returns_that_model(trio):
    base, models = trio
    model, n = models[0], 3
    assert_state_close(merge("task_arithmetic", base, [model] * n, lam=1 / n).state_dict, model)
    assert_state_close(merge("ta", base, [model] * n).state_dict, model)  # default λ = 1/N
    assert_state_close(merge("ties", base, [model] * n, lam=1.0, top_k=1.0).state_dict, model)
    assert_state_close(merge("dare", base, [model] * n, p=0.0).state_dict, model)
    # With trimming, N copies give what TIES gives for the model alone.
    assert_state_close(merge("ties", base, [model] * n).state_dict, merge("ties", base, [model]).state_dict)


def test_every_method_is_deterministic_keeps_inputs_and_output_layout(trio):
    base, models = trio
    snapshot = [{k: v.clone() for k, v in sd.items()} for sd in [base, *models]]
    for method in available_methods():
        params = method_inputs(method, base, len(models), steps=5)
        first = merge(method, base, models, seed=3, **params)
        second = merge(method, base, models, seed=3, **params)
        assert list(first.state_dict) == list(base)
        for key in base:
            assert torch.equal(first.state_dict[key], second.state_dict[key]), (method, key)
            assert first.state_dict[key].data_ptr() != base[key].data_ptr()
        json.dumps(first.record())
    for original, now in zip(snapshot, [base, *models]):
        assert all(torch.equal(original[k], now[k]) for k in original)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_are_preserved(dtype):
    base = bert_like(0, dtype=dtype)
    models = [finetune(base, i) for i in range(2)]
    for method in available_methods():
        merged = merge(method, base, models, **method_inputs(method, base, len(models), steps=3)).state_dict
        assert all(merged[k].dtype == dtype for k in base), method


def test_prefixed_keys_and_buffers():
    base = bert_like(0, prefix="bert.")
    base["bert.embeddings.position_ids"] = torch.arange(12).unsqueeze(0)
    models = [finetune(base, i) for i in range(2)]
    for model in models:
        model["bert.embeddings.position_ids"] = base["bert.embeddings.position_ids"].clone()
    result = merge("doge", base, models, steps=2)
    assert result.info["n_doge_keys"] == 6 * LAYERS
    assert torch.equal(result.state_dict["bert.embeddings.position_ids"], base["bert.embeddings.position_ids"])
    models[1]["bert.embeddings.position_ids"] = models[1]["bert.embeddings.position_ids"] + 1
    with pytest.raises(ValueError, match="bert.embeddings.position_ids"):
        merge("ties", base, models)


def test_non_contiguous_inputs_merge_like_contiguous_ones(trio):
    base, models = trio
    key = "encoder.layer.0.attention.self.query.weight"
    strided = [dict(m, **{key: m[key].t().contiguous().t()}) for m in models]
    strided_base = dict(base, **{key: base[key].t().contiguous().t()})
    assert not strided_base[key].is_contiguous()
    for method in ("ta", "ties"):
        assert_state_close(merge(method, strided_base, strided).state_dict, merge(method, base, models).state_dict)


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("embeddings.word_embeddings.weight", "embedding"),
        ("bert.embeddings.LayerNorm.weight", "norm"),
        ("encoder.layer.0.attention.output.LayerNorm.bias", "norm"),
        ("distilbert.transformer.layer.0.sa_layer_norm.weight", "norm"),
        ("encoder.layer.3.attention.self.query.weight", "matrix"),
        ("bert.encoder.layer.3.intermediate.dense.bias", "bias"),
    ],
)
def test_key_kinds(key, kind):
    shape = (4,) if kind in ("norm", "bias") else (4, 4)
    assert classify_key(key, torch.zeros(shape)) == kind


# ---- errors ---------------------------------------------------------------------------------------


def test_mismatches_raise_errors_naming_the_key(trio):
    base, models = trio
    key = "encoder.layer.0.attention.self.value.weight"
    missing = {k: v for k, v in models[0].items() if k != key}
    with pytest.raises(ValueError, match=key):
        merge("ties", base, [missing])
    extra = dict(models[0], **{"classifier.weight": torch.zeros(2, HIDDEN)})
    with pytest.raises(ValueError, match="classifier.weight"):
        merge("ta", base, [extra])
    reshaped = dict(models[0], **{key: torch.zeros(HIDDEN + 1, HIDDEN)})
    with pytest.raises(ValueError, match=f"shape mismatch for '{key}'"):
        merge("doge", base, [reshaped])
    recast = dict(models[0], **{key: models[0][key].half()})
    with pytest.raises(ValueError, match=f"dtype mismatch for '{key}'"):
        merge("dare", base, [recast])


def test_bad_method_and_parameters(trio):
    base, models = trio
    with pytest.raises(ValueError, match="unknown merge method"):
        merge("slerp", base, models)
    with pytest.raises(ValueError, match="unknown parameter"):
        merge("ties", base, models, k=0.2)
    with pytest.raises(ValueError, match="top_k"):
        merge("ties", base, models, top_k=20)
    with pytest.raises(ValueError, match="drop probability"):
        merge("dare", base, models, p=1.0)
    with pytest.raises(ValueError, match="non-empty sequence"):
        merge("ta", base, [])
    assert method_defaults("ties") == {"lam": 1.0, "top_k": 0.2}
    assert set(available_methods()) == {"dare", "doge", "iso_c", "iso_cts", "regmean", "task_arithmetic", "ties", "tsv_m"}


# ---- choosing parameters (gw.tuning) --------------------------------------------------------------


def test_grid_search_picks_the_best_and_records_the_table():
    from gw.tuning import grid_search

    seen = []

    def evaluate(params):
        seen.append(params)
        return -abs(params["lam"] - 0.7) - abs(params["top_k"] - 0.2)

    result = grid_search({"lam": [0.5, 0.7, 1.0], "top_k": [0.1, 0.2]}, evaluate, fixed={"combine": "ties"})
    assert result.best_params == {"combine": "ties", "lam": 0.7, "top_k": 0.2}
    assert len(result.table) == len(seen) == 6 and all(p["combine"] == "ties" for p in seen)
    json.dumps(result.to_dict())


def test_grid_search_ties_nan_and_errors():
    from gw.tuning import grid_search, worst_change

    result = grid_search([{"lam": 1.0}, {"lam": 2.0}, {"lam": 3.0}], lambda p: float("nan") if p["lam"] == 1 else 0.5)
    assert result.best_params == {"lam": 2.0}  # NaN ranks last, the earlier of equals wins
    assert result.to_dict()["table"][0]["score"] is None
    with pytest.raises(ValueError, match="NaN"):
        grid_search({"lam": [1.0]}, lambda p: float("nan"))
    with pytest.raises(ValueError, match="overrides fixed"):
        grid_search({"lam": [1.0]}, lambda p: 0.0, fixed={"lam": 2.0})
    with pytest.raises(ValueError, match="non-empty sequence"):
        grid_search({"lam": []}, lambda p: 0.0)
    assert worst_change({"a": 0.8, "b": 0.7}, {"a": 0.79, "b": 0.72}) == pytest.approx(-0.01)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare", "doge", "tsv_m", "iso_c", "iso_cts", "regmean"])
def test_default_grids_are_valid_merge_parameters(method, trio):
    from gw.tuning import default_grid

    base, models = trio
    grid = default_grid(method)
    assert len(grid) >= 3
    accepted = set(method_defaults(method))
    assert all(set(candidate) <= accepted for candidate in grid)
    merge(method, base, models, **grid[0], **method_inputs(method, base, len(models), steps=2))
