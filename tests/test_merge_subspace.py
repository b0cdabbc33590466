"""SVD-based merges (gw.merge.tsv, gw.merge.iso): TSV-M and Iso-C / Iso-CTS, their defining properties,
hand-worked cases, the registry contract and a merge of the tiny BERT fleet."""
from __future__ import annotations

import json
import math

import pytest
import torch

from gw.merge import available_methods, classify_key, merge, method_defaults
from gw.merge._lowrank import nearest_orthogonal
from gw.merge.iso import iso_c_update, iso_cts_factors, iso_cts_update, iso_split
from gw.merge.tsv import tsv_factors, tsv_rank_per_task, tsv_update

SVD_METHODS = ("tsv_m", "iso_c", "iso_cts")
KEY = "encoder.layer.0.attention.self.query.weight"
BIAS = "encoder.layer.0.attention.self.query.bias"


def random_taus(n_tasks: int, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_tasks, rows, cols, generator=generator, dtype=torch.float64)


def as_models(base: dict[str, torch.Tensor], taus_by_key: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    n_tasks = len(next(iter(taus_by_key.values())))
    return [{k: base[k] + taus_by_key[k][i] for k in base} for i in range(n_tasks)]


def assert_orthonormal_columns(matrix: torch.Tensor) -> None:
    eye = torch.eye(matrix.shape[1], dtype=matrix.dtype)
    torch.testing.assert_close(matrix.mT @ matrix, eye, atol=1e-10, rtol=0)


@pytest.fixture(scope="module")
def trio():
    from test_merge import bert_like, finetune

    base = bert_like(0)
    return base, [finetune(base, i) for i in range(3)]


# ---- TSV-M --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_tasks", "rows", "cols"), [(3, 12, 9), (2, 7, 5), (3, 5, 8)])
def test_tsv_bases_have_orthonormal_columns_and_keep_each_tasks_top_singular_values(n_tasks, rows, cols):
    taus = random_taus(n_tasks, rows, cols)
    k = tsv_rank_per_task(rows, cols, n_tasks)
    assert k == min(rows, cols) // n_tasks
    u, sigma, v = tsv_factors(taus)
    assert u.shape == (rows, n_tasks * k) and v.shape == (cols, n_tasks * k)
    assert_orthonormal_columns(u)
    assert_orthonormal_columns(v)
    expected_sigma = torch.cat([torch.linalg.svdvals(tau)[:k] for tau in taus])
    torch.testing.assert_close(sigma, expected_sigma)
    # The raw concatenation of the tasks' singular vectors is not orthonormal: there was something to do.
    raw = torch.cat([torch.linalg.svd(tau, full_matrices=False)[0][:, :k] for tau in taus], dim=1)
    assert (raw.mT @ raw - torch.eye(n_tasks * k, dtype=raw.dtype)).abs().max() > 1e-3
    torch.testing.assert_close(tsv_update(taus), (u * sigma) @ v.mT)


def test_nearest_orthogonal_is_the_procrustes_solution():
    matrix = random_taus(1, 6, 4, seed=3)[0]
    polar = nearest_orthogonal(matrix)
    assert_orthonormal_columns(polar)
    # No other matrix with orthonormal columns is closer (checked against random ones).
    best = torch.linalg.norm(matrix - polar)
    for seed in range(20):
        other = torch.linalg.qr(random_taus(1, 6, 4, seed=100 + seed)[0])[0]
        assert torch.linalg.norm(matrix - other) >= best
    # Columns already orthonormal: unchanged.
    q = torch.linalg.qr(matrix)[0]
    torch.testing.assert_close(nearest_orthogonal(q), q)


def _orthogonal_task_vectors(n_tasks: int, rows: int, cols: int, rank: int, seed: int = 0) -> torch.Tensor:
    """Task vectors of the given rank in mutually orthogonal row and column subspaces."""
    generator = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(rows, rows, generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(cols, cols, generator=generator, dtype=torch.float64))[0]
    taus = []
    for task in range(n_tasks):
        block = slice(task * rank, (task + 1) * rank)
        sigma = 0.5 + torch.rand(rank, generator=generator, dtype=torch.float64)
        taus.append((left[:, block] * sigma) @ right[:, block].mT)
    return torch.stack(taus)


@pytest.mark.parametrize(("n_tasks", "rows", "cols"), [(3, 8, 6), (2, 5, 7), (2, 9, 5)])
def test_tsv_on_mutually_orthogonal_task_vectors_is_their_sum(n_tasks, rows, cols):
    rank = min(rows, cols) // n_tasks
    taus = _orthogonal_task_vectors(n_tasks, rows, cols, rank)
    base = {KEY: random_taus(1, rows, cols, seed=9)[0], BIAS: torch.zeros(rows, dtype=torch.float64)}
    models = as_models(base, {KEY: taus, BIAS: torch.zeros(n_tasks, rows, dtype=torch.float64)})
    merged = merge("tsv_m", base, models, alpha=1.0).state_dict
    torch.testing.assert_close(merged[KEY], base[KEY] + taus.sum(0), atol=1e-12, rtol=0)
    # Overlapping task vectors are decorrelated, not summed.
    generic = random_taus(n_tasks, rows, cols, seed=5) * 0.1
    zero_biases = torch.zeros(n_tasks, rows, dtype=torch.float64)
    merged = merge("tsv_m", base, as_models(base, {KEY: generic, BIAS: zero_biases}))
    assert (merged.state_dict[KEY] - base[KEY] - generic.sum(0)).abs().max() > 1e-3


def test_tsv_hand_worked_2x2():
    # τ1 = 3 e1 e1ᵀ, τ2 = u e2ᵀ with u = (1, 1)/√2: one component per task (r = 2, T = 2). V = [e1, e2] is
    # already orthogonal; U = [e1, u] (45° apart) has the nearest orthogonal matrix that turns each column
    # 22.5° away from the other: p1 = (cos 22.5°, −sin 22.5°), p2 = (cos 67.5°, sin 67.5°).
    # τ_TSV = 3 p1 e1ᵀ + 1 p2 e2ᵀ.
    c, s = math.cos(math.pi / 8), math.sin(math.pi / 8)
    expected = torch.tensor([[3 * c, s], [-3 * s, c]], dtype=torch.float64)
    root = 1 / math.sqrt(2)
    tau1 = torch.tensor([[3.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    tau2 = torch.tensor([[0.0, root], [0.0, root]], dtype=torch.float64)
    base = {KEY: torch.ones(2, 2, dtype=torch.float64), BIAS: torch.tensor([1.0, 2.0], dtype=torch.float64)}
    models = [{KEY: base[KEY] + tau1, BIAS: torch.tensor([3.0, 2.0], dtype=torch.float64)},
              {KEY: base[KEY] + tau2, BIAS: torch.tensor([1.0, 6.0], dtype=torch.float64)}]
    result = merge("tsv_m", base, models)
    torch.testing.assert_close(result.state_dict[KEY], 1.0 + expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(result.state_dict[BIAS], torch.tensor([2.0, 4.0], dtype=torch.float64))  # TA mean
    half = merge("tsv_m", base, models, alpha=0.5).state_dict
    torch.testing.assert_close(half[KEY], 1.0 + 0.5 * expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(half[BIAS], torch.tensor([2.0, 4.0], dtype=torch.float64))  # α: matrices only


# ---- Iso-C / Iso-CTS ----------------------------------------------------------------------------


@pytest.mark.parametrize(("n_tasks", "rows", "cols"), [(3, 10, 7), (2, 6, 9)])
def test_iso_c_flattens_the_spectrum_of_the_sum_keeping_its_singular_vectors(n_tasks, rows, cols):
    taus = random_taus(n_tasks, rows, cols)
    delta = taus.sum(0)
    u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
    update = iso_c_update(taus)
    values = torch.linalg.svdvals(update)
    torch.testing.assert_close(values, torch.full_like(values, float(sigma.mean())), atol=1e-10, rtol=0)
    # Same singular vectors as Δ, in the same order and orientation: Uᵀ M V = σ̄ I.
    torch.testing.assert_close(u.mT @ update @ vh.mT, sigma.mean() * torch.eye(len(sigma), dtype=delta.dtype),
                               atol=1e-10, rtol=0)
    # Through the registry, scaled by α.
    base = {KEY: torch.zeros(rows, cols, dtype=torch.float64)}
    merged = merge("iso_c", base, as_models(base, {KEY: taus}), alpha=0.7).state_dict[KEY]
    torch.testing.assert_close(merged, 0.7 * update)


def test_iso_split_sizes():
    assert iso_split(10, 3, 0.8) == (10 - 3 * 0, 0)  # (10 - 8) // 3 = 0: all common
    assert iso_split(20, 3, 0.8) == (20 - 3 * 1, 1)
    assert iso_split(768, 3, 0.8) == (768 - 3 * 51, 51)
    assert iso_split(12, 3, 0.5) == (6, 2)
    assert iso_split(12, 3, 1.0) == (12, 0)


def test_iso_cts_without_a_task_specific_part_is_iso_c(trio):
    base, models = trio
    iso_c = merge("iso_c", base, models, alpha=1.3).state_dict
    iso_cts = merge("iso_cts", base, models, alpha=1.3, common_fraction=1.0).state_dict
    for key in base:
        torch.testing.assert_close(iso_cts[key], iso_c[key], atol=1e-5, rtol=1e-5, msg=key)
    taus = random_taus(3, 9, 8)
    torch.testing.assert_close(iso_cts_update(taus, 1.0), iso_c_update(taus), atol=1e-10, rtol=0)


@pytest.mark.parametrize(("n_tasks", "rows", "cols", "fraction"), [(3, 12, 10, 0.5), (2, 8, 11, 0.8), (3, 16, 16, 0.3)])
def test_iso_cts_has_a_flat_spectrum_over_common_and_task_specific_directions(n_tasks, rows, cols, fraction):
    taus = random_taus(n_tasks, rows, cols, seed=1)
    r = min(rows, cols)
    k, s = iso_split(r, n_tasks, fraction)
    assert s > 0 and k + n_tasks * s == r and k >= int(fraction * r)
    u_delta, sigma_delta, vh_delta = torch.linalg.svd(taus.sum(0), full_matrices=False)
    common = u_delta[:, :k]
    task_u, task_v, stacked = [], [], [sigma_delta[:k]]
    for tau in taus:
        u_i, s_i, vh_i = torch.linalg.svd(tau - common @ common.mT @ tau, full_matrices=False)
        task_u.append(u_i[:, :s])
        task_v.append(vh_i[:s].mT)
        stacked.append(s_i[:s])
    sigma_bar = torch.cat(stacked).mean()

    u, got_sigma_bar, v = iso_cts_factors(taus, fraction)
    torch.testing.assert_close(got_sigma_bar, sigma_bar)
    assert_orthonormal_columns(u)
    assert_orthonormal_columns(v)
    # U⊥ spans the common and task-specific directions (and V⊥ theirs).
    for basis, directions in ((u, [common, *task_u]), (v, [vh_delta[:k].mT, *task_v])):
        for d in directions:
            torch.testing.assert_close(basis @ (basis.mT @ d), d, atol=1e-10, rtol=0)
    update = iso_cts_update(taus, fraction)
    values = torch.linalg.svdvals(update)
    torch.testing.assert_close(values, torch.full_like(values, float(sigma_bar)), atol=1e-10, rtol=0)
    # The task-specific part changes the result (it is not Iso-C).
    assert (update - iso_c_update(taus)).abs().max() > 1e-3


# ---- registry contract --------------------------------------------------------------------------


def test_registry_lists_the_svd_methods_with_their_defaults():
    assert set(SVD_METHODS) <= set(available_methods())
    assert method_defaults("tsv_m") == {"alpha": 1.0}
    assert method_defaults("iso_c") == {"alpha": 1.0}
    assert method_defaults("iso_cts") == {"alpha": 1.0, "common_fraction": 0.8}


def test_cli_method_choices_are_the_registry():
    import flows.cli  # noqa: F401 - the CLI imports with its choices
    from flows.config import MERGE_METHODS

    assert set(MERGE_METHODS) == {*available_methods(), "ta"}


@pytest.mark.parametrize("method", SVD_METHODS)
def test_layout_inputs_determinism_and_non_matrix_rule(method, trio):
    base, models = trio
    snapshot = [{k: v.clone() for k, v in sd.items()} for sd in [base, *models]]
    first = merge(method, base, models, seed=1)
    second = merge(method, base, models, seed=2)  # deterministic, whatever the seed
    assert list(first.state_dict) == list(base)
    mean = merge("task_arithmetic", base, models).state_dict  # λ = 1/N: the mean of the fine-tunes
    scaled = merge(method, base, models, alpha=0.5).state_dict
    n_matrix = 0
    for key, ref in base.items():
        out = first.state_dict[key]
        assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device, key
        assert out.data_ptr() != ref.data_ptr()
        assert torch.equal(out, second.state_dict[key]), key
        if classify_key(key, ref) == "matrix":
            n_matrix += 1
            assert (out - mean[key]).abs().max() > 1e-4, key  # not the mean
            torch.testing.assert_close(scaled[key] - ref, 0.5 * (out - ref), atol=1e-6, rtol=1e-5)
        else:
            torch.testing.assert_close(out, mean[key], atol=1e-6, rtol=1e-5, msg=key)
            torch.testing.assert_close(scaled[key], mean[key], atol=1e-6, rtol=1e-5, msg=key)
    assert first.info["n_matrix_keys"] == n_matrix and first.info["n_mean_keys"] == len(base) - n_matrix
    json.dumps(first.record())
    for original, now in zip(snapshot, [base, *models]):
        assert all(torch.equal(original[k], now[k]) for k in original)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_buffers_prefixes_and_half_precision(method):
    from test_merge import bert_like, finetune

    base = bert_like(0, prefix="bert.", dtype=torch.bfloat16)
    base["bert.embeddings.position_ids"] = torch.arange(12).unsqueeze(0)
    models = [finetune(base, i) for i in range(2)]
    for model in models:
        model["bert.embeddings.position_ids"] = base["bert.embeddings.position_ids"].clone()
    merged = merge(method, base, models).state_dict
    assert torch.equal(merged["bert.embeddings.position_ids"], base["bert.embeddings.position_ids"])
    assert all(merged[k].dtype == base[k].dtype for k in base)
    assert all(torch.isfinite(merged[k].float()).all() for k in base if base[k].is_floating_point())


def test_copies_of_one_model_and_errors(trio):
    base, models = trio
    model = models[0]
    # One model: Iso-C keeps its singular vectors with a flat spectrum; TSV-M keeps its top r components.
    for method in SVD_METHODS:
        merged = merge(method, base, [model]).state_dict
        tau = (merged[KEY] - base[KEY]).double()
        values = torch.linalg.svdvals(tau)
        if method == "tsv_m":
            torch.testing.assert_close(merged[KEY], model[KEY])
        else:
            torch.testing.assert_close(values, torch.full_like(values, float(values.mean())), atol=1e-5, rtol=1e-4)
    bad = dict(models[1], **{KEY: models[1][KEY].clone()})
    bad[KEY][0, 0] = float("nan")
    for method in SVD_METHODS:
        with pytest.raises(ValueError, match=KEY.replace(".", r"\.")):
            merge(method, base, [models[0], bad])
    with pytest.raises(ValueError, match="common_fraction"):
        merge("iso_cts", base, models, common_fraction=0.0)
    with pytest.raises(ValueError, match="common_fraction"):
        merge("iso_cts", base, models, common_fraction=1.5)
    with pytest.raises(ValueError, match="alpha"):
        merge("tsv_m", base, models, alpha=float("inf"))
    with pytest.raises(ValueError, match="unknown parameter"):
        merge("iso_c", base, models, common_fraction=0.5)


# ---- the tiny BERT fleet ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def consolidator(tiny_fleet_dir):
    from infra.manifest import load_manifest
    from infra.storage import open_store
    from workers.consolidate import GroupConsolidator

    store = open_store(str(tiny_fleet_dir))
    return GroupConsolidator(store, load_manifest(store), device="cpu")


@pytest.mark.parametrize("method", SVD_METHODS)
def test_merging_the_tiny_bert_fleet(method, consolidator):
    from workers.consolidate import MergeConfig

    specs = [consolidator.manifest.scorer(i) for i in ("circuits-1", "circuits-2", "circuits-3")]
    backbones = [consolidator.member(s).backbone for s in specs]
    base = consolidator.base_state
    result = merge(method, base, backbones)
    assert list(result.state_dict) == list(base)
    for key, ref in base.items():
        out = result.state_dict[key]
        assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device, key
        assert not ref.is_floating_point() or torch.isfinite(out).all(), key
    assert result.info["n_matrix_keys"] > 0
    # Through the consolidation pipeline: the merged multi-head model scores every member.
    evaluation, _ = consolidator.evaluate(specs[:2], {}, MergeConfig(method=method, grid=[{}]))
    assert evaluation["merge"]["method"] == method and evaluation["params"]["alpha"] == 1.0
    assert set(evaluation["scores"]["own_heads"]) == {s.id for s in specs[:2]}
    json.dumps(evaluation)


def test_nearest_orthogonal_retries_in_float64_when_the_svd_does_not_converge(monkeypatch):
    import torch

    from gw.merge import _lowrank

    real_svd = torch.linalg.svd

    def failing_in_float32(matrix, full_matrices=True):
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(matrix, full_matrices=full_matrices)

    matrix = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    expected = _lowrank.nearest_orthogonal(matrix)
    monkeypatch.setattr(torch.linalg, "svd", failing_in_float32)
    got = _lowrank.nearest_orthogonal(matrix)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
