"""The one stopping rule of both Sinkhorn loops (gw/entropic/sinkhorn.py): one pair and a batch agree."""

from __future__ import annotations

import itertools
import math

import torch

from gw.entropic.sinkhorn import _PLAIN_WARMUP, _STALL_WINDOW, _stopping_rule

VALUES = [0.0, 1e-3, 0.5, 1.0, 1e6, math.inf, math.nan]


def test_float_and_tensor_forms_agree():
    cases = list(itertools.product([3, _PLAIN_WARMUP - 1, _STALL_WINDOW - 1, 2 * _STALL_WINDOW - 1],
                                   VALUES, [1e-3], VALUES, VALUES, [False, True]))
    batch = [torch.tensor(column, dtype=torch.float64) for column in zip(*(c[1:5] for c in cases))]
    stalled = torch.tensor([c[5] for c in cases])
    for it in {c[0] for c in cases}:
        rows = [i for i, c in enumerate(cases) if c[0] == it]
        picked = [x[rows] for x in batch]
        got = _stopping_rule(it, *picked, stalled[rows], torch.ones(len(rows), dtype=torch.bool))
        for j, i in enumerate(rows):
            one = _stopping_rule(it, *cases[i][1:5], cases[i][5])
            assert bool(got[0][j]) == one[0] and bool(got[1][j]) == one[1] and bool(got[4][j]) == one[4], cases[i]


def test_rule_examples():
    inf = math.inf
    # below tolerance: done
    assert _stopping_rule(4, 1e-4, 1e-3, inf, inf, False)[0]
    # the error grew 100x since over-relaxation started: diverged, not done
    done, diverged, *_ = _stopping_rule(14, 0.5, 1e-3, 1e-3, inf, False)
    assert diverged and not done
    # little progress over a stall window: stalled and done; the window restarts from this error
    done, _, _, reference, stalled = _stopping_rule(_STALL_WINDOW - 1, 0.95, 1e-3, 1.0, 1.0, False)
    assert done and stalled and reference == 0.95
    # pairs no longer active are never done or diverged again
    out = _stopping_rule(4, torch.tensor([0.0, inf], dtype=torch.float64), torch.tensor([1e-3, 1e-3], dtype=torch.float64),
                         torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([inf, inf], dtype=torch.float64),
                         torch.tensor([False, False]), torch.tensor([False, False]))
    assert not out[0].any() and not out[1].any()
