"""Fleet figures, storage and paired comparisons for the quality benchmark (pure functions)."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from workers.evaluate import fleet_figures

FIGURES = ("accuracy", "macro_f1", "micro_f1", "qwk")


def fleet_summary(per_item: Mapping[str, dict], predictions: Mapping[str, Sequence[int]] | None = None,
                  labels: Mapping[str, Sequence[int]] | None = None) -> dict:
    """Item metrics weighted by split size (as GW-SMM reports them) plus micro F1 over every answer.

    Micro F1 pools all answers of all items; for single-label multi-class items it equals the pooled
    accuracy (the weighted mean of item accuracies).
    """
    fleet = fleet_figures({i: dict(m) for i, m in per_item.items()})
    out = {k: _round(fleet.get(k)) for k in ("accuracy", "macro_f1", "qwk")}
    if predictions is not None and labels is not None:
        correct = sum(int(np.sum(np.asarray(predictions[i]) == np.asarray(labels[i]))) for i in per_item)
        total = sum(len(labels[i]) for i in per_item)
        out["micro_f1"] = _round(correct / total if total else math.nan)
    return out


def _round(value) -> float | None:
    return None if value is None or value != value else round(float(value), 4)


def storage(n_items: int, n_backbones: int, backbone_bytes: int, head_bytes: int, adapter_bytes: int = 0) -> dict:
    """Serving storage before (one encoder + head per item) and after (one encoder per backbone, and the
    items' correction adapters)."""
    before = n_items * (backbone_bytes + head_bytes)
    after = n_backbones * backbone_bytes + n_items * head_bytes + adapter_bytes
    return {"items": n_items, "backbones": n_backbones, "bytes_before": before, "bytes_after": after,
            "ratio": round(before / after, 3)}


def paired_comparison(ours: Mapping[str, float], theirs: Mapping[str, float], weights: Mapping[str, int], *,
                      n_boot: int = 10000, seed: int = 0) -> dict:
    """Ours minus theirs over items: weighted mean difference with a bootstrap 95% interval (items
    resampled), and a two-sided sign test over the items whose figures differ."""
    items = sorted(i for i in ours if i in theirs and ours[i] is not None and theirs[i] is not None)
    diff = np.array([ours[i] - theirs[i] for i in items], dtype=np.float64)
    w = np.array([weights[i] for i in items], dtype=np.float64)
    mean = float(np.sum(w * diff) / np.sum(w))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(items), size=(n_boot, len(items)))
    boot = np.sum(w[draws] * diff[draws], axis=1) / np.sum(w[draws], axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    wins, losses = int(np.sum(diff > 1e-12)), int(np.sum(diff < -1e-12))
    return {"mean_diff": round(mean, 4), "ci95": [round(float(low), 4), round(float(high), 4)],
            "wins": wins, "losses": losses, "ties": len(items) - wins - losses,
            "sign_test_p": round(sign_test(wins, losses), 4)}


def against_random_partitions(plan: float, random: Sequence[float]) -> dict:
    """A plan's figure against those of random partitions of the same fleet (each a mean over the folds).

    The paired interval over items says whether a plan beats the random plans' *mean* on these answers; it
    cannot say whether a planner picks better partitions than chance, since one partition can be lucky. This
    asks that of the plan's own figure: how many random partitions reach it (`empirical_p`: that count + 1
    over their number + 1), and how far above them it lies in units of their spread (`t`, one-sided `t_p`
    from Student's t with n − 1 degrees of freedom, a prediction interval for one more random partition)."""
    from scipy.stats import t as student

    r = np.asarray(random, dtype=np.float64)
    if len(r) < 2:
        raise ValueError(f"against_random_partitions needs two or more random partitions, got {len(r)}")
    reached = int(np.sum(r >= plan))
    spread = float(np.std(r, ddof=1)) * math.sqrt(1 + 1 / len(r))
    t = (plan - float(r.mean())) / spread if spread > 0 else math.copysign(math.inf, plan - float(r.mean()))
    return {"plan": round(float(plan), 4), "random_mean": round(float(r.mean()), 4),
            "random_sd": round(float(np.std(r, ddof=1)), 4), "n_random": len(r), "random_reaching": reached,
            "empirical_p": round((reached + 1) / (len(r) + 1), 4), "t": round(t, 2),
            "t_p": round(float(student.sf(t, len(r) - 1)), 4)}


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial sign test (p = 1/2) on the non-tied items."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, j) for j in range(0, min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)
