"""Simulated operating characteristic of the gate: how often it accepts or rejects a member whose true
macro F1 change is known.

The model (stated, so that the figures can be judged): 3 classes with Beetle's label priors
(0.45 / 0.15 / 0.40 for correct / contradictory / incorrect). The own scorer's logits for an answer of
class y are a·e_y + ε + log prior with ε ~ N(0, I), a set so that its accuracy is 0.65 (Beetle's
pre-merge accuracy). The merged model's logits are a_m·e_y + ε_m + log prior with
ε_m = ρ ε + √(1 − ρ²) ε', so ρ says how closely its errors follow the own scorer's; a_m is set by
bisection so that the *population* macro F1 (on 200,000 answers) changes by exactly the requested
amount. Each draw scores n validation answers by both models and asks the rule.
"""
from __future__ import annotations

import functools

import numpy as np
from scipy.optimize import brentq

from gw.gate import Evidence, GateRule

PRIORS = np.array([0.45, 0.15, 0.40])
OWN_ACCURACY = 0.65
_POPULATION = 200_000


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _logits(y: np.ndarray, signal: float, noise: np.ndarray) -> np.ndarray:
    return signal * np.eye(len(PRIORS))[y] + noise + np.log(PRIORS)


def _macro_f1(y: np.ndarray, predicted: np.ndarray) -> float:
    scores = []
    for k in range(len(PRIORS)):
        tp, fp, fn = np.sum((y == k) & (predicted == k)), np.sum((y != k) & (predicted == k)), np.sum((y == k) & (predicted != k))
        scores.append(2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0)
    return float(np.mean(scores))


@functools.lru_cache(maxsize=None)
def _population(seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.choice(len(PRIORS), _POPULATION, p=PRIORS)
    return y, rng.standard_normal((_POPULATION, 3)), rng.standard_normal((_POPULATION, 3))


@functools.lru_cache(maxsize=None)
def calibrate(correlation: float, change: float) -> tuple[float, float]:
    """(own signal, merged signal): the own scorer at accuracy 0.65, the merged one at the macro F1 change."""
    y, eps, fresh = _population()
    own = brentq(lambda a: np.mean(_logits(y, a, eps).argmax(-1) == y) - OWN_ACCURACY, 0.01, 5.0)
    f1_own = _macro_f1(y, _logits(y, own, eps).argmax(-1))
    merged_noise = correlation * eps + np.sqrt(1 - correlation ** 2) * fresh
    merged = brentq(lambda a: _macro_f1(y, _logits(y, a, merged_noise).argmax(-1)) - f1_own - change, -2.0, 8.0)
    return float(own), float(merged)


def simulate_oc(rule: GateRule, n_validation: int, true_change: float, correlation: float, *, draws: int = 2000,
                seed: int = 1) -> float:
    """The share of draws in which `rule` accepts a member with this true macro F1 change."""
    own_signal, merged_signal = calibrate(float(correlation), float(true_change))
    rng = np.random.default_rng(seed)
    y = rng.choice(len(PRIORS), (draws, n_validation), p=PRIORS)
    eps = rng.standard_normal((draws, n_validation, 3))
    merged_noise = correlation * eps + np.sqrt(1 - correlation ** 2) * rng.standard_normal(eps.shape)
    own_probs, merged_probs = _softmax(_logits(y, own_signal, eps)), _softmax(_logits(y, merged_signal, merged_noise))
    accepted = 0
    for d in range(draws):
        own, merged = Evidence("multiclass", y[d], own_probs[d]), Evidence("multiclass", y[d], merged_probs[d])
        accepted += rule.check("m", own, merged).passed
    return accepted / draws
