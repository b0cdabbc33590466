"""Exact per-task magnitude thresholds ("keep the top k% of each task vector") without a flat copy.

A two-pass radix select over the float32 bit patterns of |τ| (non-negative IEEE floats order like their
bit patterns read as integers), streaming the task vectors chunk by chunk:

1. histogram the high 16 bits of |τ_i| per task (32,768 bins); the bin holding the k-th largest value,
   and the rank of that value inside its bin, follow from a cumulative sum;
2. histogram the low 16 bits of the entries that fall in that bin (the others go to a junk region),
   which pins down the exact bit pattern of the k-th largest value.

Each pass is five element-wise ops and one ``bincount`` per chunk, with O(bins) memory: no model-sized
copy, no sort, no candidate gathering. "Top k" keeps ceil(k·numel) entries plus any entries tied with
the threshold. For float64 checkpoints the magnitudes are ranked after rounding to float32, so ties are
resolved at float32 resolution (the kept count can differ from ceil(k·numel) by the few entries that
round onto the threshold).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from gw.merge._state import Workspace

_LOW_BITS = 16
_HIGH_BINS = 1 << (31 - _LOW_BITS)  # the sign bit is zero for |x|
_LOW_BINS = 1 << _LOW_BITS
_FIRST_NONFINITE_BIN = 0x7F800000 >> _LOW_BITS  # +inf and NaN bit patterns start here

ChunkStream = Callable[[], Iterable[tuple[str, int, int, Tensor]]]


def kept_count(fraction: float, numel: int) -> int:
    """How many entries "the top `fraction`" keeps: ceil(fraction·numel), at least 1 when numel > 0."""
    if numel == 0:
        return 0
    # The small slack stops 0.2 * 5 = 1.0000000000000002 from rounding up to 2.
    return min(numel, max(1, math.ceil(fraction * numel - 1e-9)))


def _magnitude_bits(taus: Tensor, workspace: Workspace) -> Tensor:
    """|τ| rounded to float32 and read as int32 [N, chunk], in a reused buffer."""
    magnitudes = workspace.get("magnitude_bits", tuple(taus.shape), torch.float32, taus.device)
    if taus.dtype == torch.float32:
        torch.abs(taus, out=magnitudes)
    else:
        magnitudes.copy_(taus).abs_()
    return magnitudes.view(torch.int32)


def _task_offsets(n_tasks: int, bins_per_task: int, device: torch.device) -> Tensor:
    return (torch.arange(n_tasks, device=device, dtype=torch.int32) * bins_per_task).unsqueeze(1)


def _rank_from_top(counts: Tensor, rank: Tensor) -> tuple[Tensor, Tensor]:
    """For each row of histogram `counts` [T, B], the bin holding the rank-th largest entry (1 = the
    largest) and that entry's rank inside the bin."""
    from_top = counts.flip(1).cumsum(1)
    index_from_top = torch.searchsorted(from_top, rank.unsqueeze(1)).squeeze(1)
    target = counts.shape[1] - 1 - index_from_top
    above = from_top.gather(1, index_from_top.unsqueeze(1)).squeeze(1) - counts.gather(1, target.unsqueeze(1)).squeeze(1)
    return target, rank - above


def top_fraction_thresholds(
    stream: ChunkStream, n_tasks: int, numel: int, fraction: float, workspace: Workspace | None = None
) -> Tensor:
    """Per-task threshold t_i such that |τ_i| ≥ t_i keeps the ceil(fraction·numel) largest entries.

    `stream()` must yield (key, start, stop, taus[n_tasks, chunk]) and be replayable (it is called
    twice and must yield the same values). Returns a float64 CPU tensor [n_tasks] (0 when everything
    is kept). Raises ValueError naming the key on NaN or infinite entries.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = kept_count(fraction, numel)
    if k >= numel:
        return torch.zeros(n_tasks, dtype=torch.float64)
    workspace = workspace or Workspace()

    # Pass 1: high 16 bits.
    high: Tensor | None = None
    for key, _start, _stop, taus in stream():
        if taus.numel() == 0:
            continue
        bins = _magnitude_bits(taus, workspace).bitwise_right_shift_(_LOW_BITS)
        bins.add_(_task_offsets(n_tasks, _HIGH_BINS, bins.device))
        counts = torch.bincount(bins.view(-1), minlength=n_tasks * _HIGH_BINS).view(n_tasks, _HIGH_BINS)
        if bool(counts[:, _FIRST_NONFINITE_BIN:].any()) and not bool(torch.isfinite(taus).all()):
            raise ValueError(f"task vector of {key!r} has NaN or infinite entries")
        high = counts if high is None else high.add_(counts)
    if high is None:
        raise ValueError("no entries to threshold")
    high_bin, rank_in_bin = _rank_from_top(high.cpu(), torch.full((n_tasks,), k, dtype=torch.int64))

    # Pass 2: low 16 bits of the entries inside each task's target bin. Entries outside it are counted
    # in a shared junk region, spread by their own low bits: a single overflow bin would serialise
    # bincount on one counter (measured 3x slower).
    low: Tensor | None = None
    placement: dict[torch.device, tuple[Tensor, Tensor]] = {}
    for _key, _start, _stop, taus in stream():
        if taus.numel() == 0:
            continue
        if taus.device not in placement:
            task = torch.arange(n_tasks, device=taus.device, dtype=torch.int32).unsqueeze(1)
            placement[taus.device] = (high_bin.to(taus.device, torch.int32).unsqueeze(1), task)
        target, task = placement[taus.device]
        bits = _magnitude_bits(taus, workspace)
        region = workspace.get("region", tuple(taus.shape), torch.int32, taus.device)
        torch.bitwise_right_shift(bits, _LOW_BITS, out=region)
        # region = task for entries in the target bin, n_tasks (junk) for all others.
        region.sub_(target).abs_().clamp_(max=1).mul_(n_tasks - task).add_(task)
        bins = bits.bitwise_and_(_LOW_BINS - 1).add_(region.bitwise_left_shift_(_LOW_BITS))
        counts = torch.bincount(bins.view(-1), minlength=(n_tasks + 1) * _LOW_BINS)
        counts = counts[: n_tasks * _LOW_BINS].view(n_tasks, _LOW_BINS)
        low = counts if low is None else low.add_(counts)
    assert low is not None
    low_bin, _ = _rank_from_top(low.cpu(), rank_in_bin)
    bits = ((high_bin << _LOW_BITS) | low_bin).to(torch.int32)
    return bits.view(torch.float32).to(torch.float64)
