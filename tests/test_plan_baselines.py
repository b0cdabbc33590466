"""Baseline plans (gw/baselines/) and the similarities behind them (gw/similarity.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import gw.similarity as similarity
from gw.baselines import (
    cka_plan,
    default_group_sizes,
    description_plan,
    given_plan,
    linkage_plan,
    partition_modules,
    plan_from_similarity,
    random_plan,
    task_vector_plan,
)
from gw.similarity import (
    cka_matrix,
    cosine_similarity_matrix,
    linear_cka,
    similarity_to_distance,
    task_vector_cosine,
)


def ids_for(n: int) -> list[str]:
    return [f"item-{i:02d}" for i in range(n)]


def planted_points(rng: np.random.Generator, sizes: list[int], dim: int = 5, spread: float = 0.05):
    """Points in tight, well separated clusters of the given sizes; returns (points, cluster of each)."""
    centres = rng.normal(size=(len(sizes), dim)) * 10
    labels = np.repeat(np.arange(len(sizes)), sizes)
    points = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    return points, labels


def distances(points: np.ndarray) -> np.ndarray:
    return np.linalg.norm(points[:, None] - points[None], axis=-1)


def cluster_groups(ids, labels):
    return {tuple(sorted(ids[i] for i in np.flatnonzero(labels == c))) for c in np.unique(labels)}


# --------------------------------------------------------------------------------------------------
# Linkage (the paper's method)
# --------------------------------------------------------------------------------------------------


def test_linkage_recovers_planted_clusters():
    rng = np.random.default_rng(0)
    points, labels = planted_points(rng, [3, 3, 2, 3])
    ids = ids_for(len(labels))
    plan = linkage_plan(distances(points), ids, n_groups=4, k=3, fill=True)
    assert plan.method == "linkage"
    assert set(plan.groups) == cluster_groups(ids, labels)
    # Without fill it stops at the first 4 groups: each inside one cluster, fewer members.
    early = linkage_plan(distances(points), ids, n_groups=4, k=3)
    assert early.n_groups == 4
    cluster_of = dict(zip(ids, labels))
    assert all(len({cluster_of[m] for m in g}) == 1 for g in early.groups)
    assert sum(len(g) for g in early.groups) < sum(len(g) for g in plan.groups)


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
def test_linkage_respects_k_and_n_groups(linkage):
    rng = np.random.default_rng(1)
    for trial in range(10):
        n = int(rng.integers(6, 20))
        D = distances(rng.normal(size=(n, 3)))
        ids = ids_for(n)
        k = int(rng.integers(2, 5))
        n_groups = int(rng.integers(1, n // 2 + 1))
        plan = linkage_plan(D, ids, n_groups, k=k, linkage=linkage)
        assert plan.n_groups == n_groups
        assert all(2 <= len(g) <= k for g in plan.groups)
        assert set(plan.ids) == set(ids)
        unlimited = linkage_plan(D, ids, None, k=k, linkage=linkage)
        assert all(len(g) <= k for g in unlimited.groups)
        assert_nothing_can_merge(unlimited, k)


def assert_nothing_can_merge(plan, k):
    """With every pair compatible, linkage without n_groups stops only when no two clusters fit in k."""
    sizes = sorted([len(g) for g in plan.groups] + [1] * len(plan.singletons))
    assert len(sizes) < 2 or sizes[0] + sizes[1] > k, sizes


def test_linkage_cap_splits_a_big_cluster():
    rng = np.random.default_rng(2)
    points, _ = planted_points(rng, [7])
    plan = linkage_plan(distances(points), ids_for(7), None, k=3)
    assert all(len(g) <= 3 for g in plan.groups)
    assert_nothing_can_merge(plan, 3)
    assert sum(len(g) for g in plan.groups) >= 6


def test_linkage_uses_the_average_of_cross_distances():
    # b-c is the closest pair. Then a is 1.0 from b but 9.0 from c: average 5.0, while d is 4.0 from
    # both (average 4.0). Single linkage joins a (min 1.0), average and complete linkage join d.
    ids = ["a", "b", "c", "d"]
    D = np.array(
        [
            [0.0, 1.0, 9.0, 20.0],
            [1.0, 0.0, 0.5, 4.0],
            [9.0, 0.5, 0.0, 4.0],
            [20.0, 4.0, 4.0, 0.0],
        ]
    )
    assert linkage_plan(D, ids, 1, k=3, linkage="single", fill=True).groups == (("a", "b", "c"),)
    assert linkage_plan(D, ids, 1, k=3, linkage="average", fill=True).groups == (("b", "c", "d"),)
    assert linkage_plan(D, ids, 1, k=3, linkage="complete", fill=True).groups == (("b", "c", "d"),)
    # Without fill, it stops as soon as the one group exists.
    assert linkage_plan(D, ids, 1, k=3).groups == (("b", "c"),)


def test_linkage_honours_unknowns_and_tau():
    rng = np.random.default_rng(3)
    points, labels = planted_points(rng, [4, 4])
    ids = ids_for(8)
    D = distances(points)
    D_nan = D.copy()
    D_nan[0, 1] = D_nan[1, 0] = np.nan
    plan = linkage_plan(D_nan, ids, None, k=2)
    assert plan.group_of(ids[0]) != plan.group_of(ids[1])
    tight = linkage_plan(D, ids, None, k=3, tau=1.0)
    assert all(labels[int(m[-2:])] == labels[int(g[0][-2:])] for g in tight.groups for m in g)
    assert tight.tau == 1.0 and tight.objective is not None and tight.objective > 0


def test_linkage_errors():
    D = np.zeros((4, 4))
    with pytest.raises(ValueError, match="n_groups"):
        linkage_plan(D, ids_for(4), 3)
    with pytest.raises(ValueError, match="linkage"):
        linkage_plan(D, ids_for(4), 1, linkage="ward")
    with pytest.raises(ValueError, match="k must"):
        linkage_plan(D, ids_for(4), 1, k=1)


# --------------------------------------------------------------------------------------------------
# Random and given plans
# --------------------------------------------------------------------------------------------------


def test_default_group_sizes():
    assert default_group_sizes(20, 4, 3) == [3, 3, 3, 3]
    assert default_group_sizes(9, 4, 3) == [3, 2, 2, 2]
    assert default_group_sizes(8, 4, 3) == [2, 2, 2, 2]
    assert default_group_sizes(8, 0, 3) == []
    with pytest.raises(ValueError, match="n_groups"):
        default_group_sizes(7, 4, 3)


def test_random_plan_is_seeded_and_sized():
    ids = ids_for(20)
    plan = random_plan(ids, 5, k=3, seed=11)
    assert plan.method == "random" and plan.n_groups == 5
    assert sorted(len(g) for g in plan.groups) == [3] * 5
    assert set(plan.ids) == set(ids)
    assert random_plan(ids, 5, k=3, seed=11) == plan
    assert any(random_plan(ids, 5, k=3, seed=s) != plan for s in range(12, 16))
    sized = random_plan(ids, 3, k=3, seed=0, sizes=[2, 3, 2])
    assert sorted(len(g) for g in sized.groups) == [2, 2, 3]
    with pytest.raises(ValueError, match="group size"):
        random_plan(ids, 2, k=3, sizes=[2, 4])
    with pytest.raises(ValueError, match="sizes has 1"):
        random_plan(ids, 2, k=3, sizes=[2])
    with pytest.raises(ValueError, match="n_groups"):
        random_plan(ids, 11, k=3)


def test_random_plan_keeps_bases_apart():
    ids = ids_for(12)
    base_models = {i: ("x" if j < 5 else "y") for j, i in enumerate(ids)}
    for seed in range(10):
        plan = random_plan(ids, 3, k=3, seed=seed, base_models=base_models)
        assert plan.n_groups == 3
        assert all(len({base_models[m] for m in g}) == 1 for g in plan.groups)
    with pytest.raises(ValueError, match="one base model"):
        random_plan(ids, 4, k=3, base_models=base_models)  # 3 + 3 + 3 + 3 cannot fit 5 + 7


def test_given_plan():
    ids = ids_for(6)
    plan = given_plan([[ids[1], ids[0]], [ids[4], ids[3], ids[2]]], ids, k=3)
    assert plan.method == "given"
    assert plan.groups == ((ids[0], ids[1]), (ids[2], ids[3], ids[4]))
    assert plan.singletons == (ids[5],)
    assert given_plan([["a", "b"]]).ids == ("a", "b")
    with pytest.raises(ValueError, match="k=3"):
        given_plan([ids[:4]], ids, k=3)
    with pytest.raises(ValueError, match="not among the ids"):
        given_plan([["a", "zz"]], ["a", "b"])


def test_partition_modules_without_distances():
    modules = {f"m1-{i}": "fractions" for i in range(4)} | {f"m2-{i}": "energy" for i in range(7)} | {"solo": "x"}
    groups = partition_modules(modules, k=3)
    sizes_by_module = {}
    for g in groups:
        assert len({modules[m] for m in g}) == 1
        sizes_by_module.setdefault(modules[g[0]], []).append(len(g))
    assert sorted(sizes_by_module["fractions"]) == [2, 2]
    assert sorted(sizes_by_module["energy"]) == [2, 2, 3]
    assert "x" not in sizes_by_module
    plan = given_plan(groups, list(modules), k=3)
    assert plan.singletons == ("solo",)


def test_partition_modules_with_distances_puts_close_items_together():
    rng = np.random.default_rng(4)
    points, labels = planted_points(rng, [3, 3])
    ids = ids_for(6)
    shuffled = rng.permutation(6)
    ids = [ids[i] for i in shuffled]  # sorted order no longer follows the clusters
    modules = dict.fromkeys(ids, "one-module")
    groups = partition_modules(modules, k=3, D=distances(points), ids=ids)
    assert set(groups) == cluster_groups(ids, labels)
    base_models = {i: ("x" if j < 2 else "y") for j, i in enumerate(ids)}
    split = partition_modules(modules, k=3, D=distances(points), ids=ids, base_models=base_models)
    assert all(len({base_models[m] for m in g}) == 1 for g in split)
    with pytest.raises(ValueError, match="needs ids"):
        partition_modules(modules, D=distances(points))


# --------------------------------------------------------------------------------------------------
# Plans from similarities
# --------------------------------------------------------------------------------------------------


def test_plan_from_similarity_gives_the_requested_number_of_groups():
    rng = np.random.default_rng(5)
    for n_groups in (1, 3, 5):
        X = rng.normal(size=(12, 4))
        plan = plan_from_similarity(cosine_similarity_matrix(X), ids_for(12), n_groups, k=3)
        assert plan.n_groups == n_groups and plan.method == "similarity"
        assert all(len(g) <= 3 for g in plan.groups)


def test_description_plan_recovers_planted_topics():
    rng = np.random.default_rng(6)
    points, labels = planted_points(rng, [2, 3, 3], dim=16)
    ids = ids_for(8)
    plan = description_plan(points, ids, 3, k=3, fill=True)
    assert plan.method == "description"
    assert set(plan.groups) == cluster_groups(ids, labels)


def test_task_vector_plan_and_cka_plan():
    rng = np.random.default_rng(7)
    directions = rng.normal(size=(2, 50))
    vectors = np.stack([directions[i % 2] + 0.05 * rng.normal(size=50) for i in range(6)])
    ids = ids_for(6)
    plan = task_vector_plan(vectors, ids, 2, k=3, fill=True)
    assert plan.method == "task-vector-cosine"
    assert set(plan.groups) == {tuple(ids[i] for i in (0, 2, 4)), tuple(ids[i] for i in (1, 3, 5))}
    probe = rng.normal(size=(40, 8))
    maps = [rng.normal(size=(8, 8)), rng.normal(size=(8, 8))]
    features = {ids[i]: np.tanh(probe @ maps[i % 2]) @ np.linalg.qr(rng.normal(size=(8, 8)))[0] for i in range(6)}
    cka = cka_plan(features, 2, k=3, fill=True)
    assert cka.method == "cka"
    assert set(cka.groups) == set(plan.groups)


def test_similarity_to_distance():
    S = np.array([[1.0, 0.9, np.nan], [0.9, 1.0, 0.2], [np.nan, 0.2, 1.0]])
    D = similarity_to_distance(S)
    assert D[0, 1] == pytest.approx(0.0) and D[1, 2] == pytest.approx(0.7)
    assert np.isnan(D[0, 2]) and np.all(np.diag(D) == 0)


# --------------------------------------------------------------------------------------------------
# CKA
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, d", [(50, 6), (8, 20)])  # feature-space and Gram-space code paths
def test_linear_cka_properties(n, d):
    rng = np.random.default_rng(8)
    X = rng.normal(size=(n, d))
    Y = np.tanh(X @ rng.normal(size=(d, d))) + 0.3 * rng.normal(size=(n, d))
    Q = np.linalg.qr(rng.normal(size=(d, d)))[0]
    assert linear_cka(X, X) == pytest.approx(1.0)
    base = linear_cka(X, Y)
    assert 0.0 < base < 1.0
    assert linear_cka(X @ Q, Y) == pytest.approx(base)
    assert linear_cka(X, 7.5 * Y) == pytest.approx(base)
    assert linear_cka(X + 3.0, Y) == pytest.approx(base)  # centring
    assert linear_cka(Y, X) == pytest.approx(base)
    assert linear_cka(torch.from_numpy(X).float(), Y) == pytest.approx(base, rel=1e-5)
    # The two code paths agree: the value must not depend on which one was taken.
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    K, L = Xc @ Xc.T, Yc @ Yc.T
    assert base == pytest.approx((K * L).sum() / (np.linalg.norm(K) * np.linalg.norm(L)))


def test_linear_cka_errors():
    with pytest.raises(ValueError, match="same probe inputs"):
        linear_cka(np.ones((3, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="constant"):
        linear_cka(np.ones((5, 2)), np.random.default_rng(0).normal(size=(5, 2)))


def test_cka_matrix_matches_pairwise_and_blocks(monkeypatch):
    rng = np.random.default_rng(9)
    features = {f"m{i}": rng.normal(size=(30, int(rng.integers(3, 9)))) for i in range(5)}
    names = list(features)
    expected = np.array([[linear_cka(features[a], features[b]) for b in names] for a in names])
    np.testing.assert_allclose(cka_matrix(features), expected, atol=1e-12)
    monkeypatch.setattr(similarity, "_CKA_BLOCK_ELEMENTS", 2 * 30 * 30 * 2)  # blocks of two models
    np.testing.assert_allclose(cka_matrix(features), expected, atol=1e-12)
    with pytest.raises(ValueError, match="same 30 probe inputs"):
        cka_matrix({"a": rng.normal(size=(30, 3)), "b": rng.normal(size=(29, 3))})


# --------------------------------------------------------------------------------------------------
# Task-vector cosine
# --------------------------------------------------------------------------------------------------


def make_task_vectors(rng: np.random.Generator, n: int):
    shapes = {"encoder.layer.0.weight": (6, 5), "encoder.layer.0.bias": (6,), "embeddings.word": (11, 4)}
    return [{key: torch.from_numpy(rng.normal(size=shape)).float() for key, shape in shapes.items()} for _ in range(n)]


def flattened_cosine(vectors, keys=None):
    flat = np.stack([np.concatenate([v[key].double().numpy().ravel() for key in (keys or sorted(v))]) for v in vectors])
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    return unit @ unit.T


def test_task_vector_cosine_equals_flattened_cosine(monkeypatch):
    rng = np.random.default_rng(10)
    vectors = make_task_vectors(rng, 4)
    expected = flattened_cosine(vectors)
    np.testing.assert_allclose(task_vector_cosine(vectors), expected, atol=1e-9)
    monkeypatch.setattr(similarity, "_STREAM_CHUNK_ELEMENTS", 7)  # many small column chunks
    np.testing.assert_allclose(task_vector_cosine(vectors), expected, atol=1e-9)
    keys = ["encoder.layer.0.weight", "encoder.layer.0.bias"]
    np.testing.assert_allclose(task_vector_cosine(vectors, keys=keys), flattened_cosine(vectors, keys), atol=1e-9)
    flat = np.stack([np.concatenate([v[k].numpy().ravel() for k in sorted(v)]) for v in vectors])
    np.testing.assert_allclose(task_vector_cosine(flat), expected, atol=1e-6)


def test_task_vector_cosine_edge_cases():
    rng = np.random.default_rng(11)
    vectors = make_task_vectors(rng, 3)
    vectors[1] = {key: torch.zeros_like(value) for key, value in vectors[1].items()}
    S = task_vector_cosine(vectors)
    assert np.isnan(S[1]).all() and np.isnan(S[:, 1]).all()
    assert S[0, 0] == 1.0 and np.isfinite(S[0, 2])
    bad = make_task_vectors(rng, 2)
    bad[1]["encoder.layer.0.bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match="shape"):
        task_vector_cosine(bad)
    missing = make_task_vectors(rng, 2)
    del missing[1]["embeddings.word"]
    with pytest.raises(ValueError, match="lacks keys|different keys"):
        task_vector_cosine(missing)
    with pytest.raises(ValueError, match="empty"):
        task_vector_cosine([])


def test_zero_row_similarity_is_never_grouped():
    X = np.array([[1.0, 0.0], [0.99, 0.1], [0.0, 0.0], [0.0, 1.0]])
    plan = plan_from_similarity(cosine_similarity_matrix(X), ids_for(4), None, k=3)
    assert ids_for(4)[2] in plan.singletons
    assert all(len(g) >= 2 for g in plan.groups)
    assert list(itertools.chain.from_iterable(plan.groups))  # something was grouped


def test_sized_plan_keeps_the_sizes_and_groups_the_closest():
    from gw.baselines import sized_plan

    points = np.array([0.0, 0.1, 0.2, 5.0, 5.1, 9.0, 9.2])
    D = np.abs(points[:, None] - points[None])
    ids = [f"s{i}" for i in range(7)]
    plan = sized_plan(D, ids, [3, 2, 2])
    assert sorted(plan.groups) == [("s0", "s1", "s2"), ("s3", "s4"), ("s5", "s6")] and plan.singletons == ()
    assert sorted(len(g) for g in sized_plan(D, ids, [2, 2]).groups) == [2, 2]
    with pytest.raises(ValueError):
        sized_plan(D, ids, [3, 3, 3])
