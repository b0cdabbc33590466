"""Exact per-task magnitude thresholds ("keep the top k% of each task vector") without a flat copy.

Two exact methods, both streaming the task vectors chunk by chunk with O(chunk) scratch memory:

**Bracket select** (the fast path, one pass). A sample of |τ_i| (every s-th entry, about 2^18 per
task) gives a bracket [lo_i, hi_i] that holds the k-th largest magnitude with a wide margin (the
sample quantiles k/n ∓ 6 standard errors). One pass then counts, exactly, the entries above hi_i and
collects the few entries inside the bracket (about 1% of them): two ``hardshrink`` calls per task,
a sign and a dot product for the count, and a max across strided slices that finds the columns
holding bracket entries, so only those are gathered. The k-th largest is then a ``kthvalue`` over the
collected entries. The result is verified (count above < k ≤ count above + collected); if the sample
misled (a verification or a size check fails), the radix select below runs instead, so the answer is
always exact.

**Radix select** (the fallback, two passes) over the float32 bit patterns of |τ| (non-negative IEEE
floats order like their bit patterns read as integers): a histogram of the high 16 bits per task, then
one of the low 16 bits inside the bin that holds the k-th largest value.

"Top k" keeps ceil(k·numel) entries plus any entries tied with the threshold. For float64 checkpoints
the radix select ranks the magnitudes after rounding to float32, so ties are resolved at float32
resolution (the kept count can differ from ceil(k·numel) by the few entries that round onto the
threshold).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from gw.merge._state import TaskVectorSource, Workspace, compute_dtype, flat

_LOW_BITS = 16
_HIGH_BINS = 1 << (31 - _LOW_BITS)  # the sign bit is zero for |x|
_LOW_BINS = 1 << _LOW_BITS
_FIRST_NONFINITE_BIN = 0x7F800000 >> _LOW_BITS  # +inf and NaN bit patterns start here

# Bracket select: sample size per task, margin in standard errors of the sample quantile, block size of
# the gather, and the smallest task vector worth it (below this the radix select is as fast).
SAMPLE_SIZE = 1 << 18
BRACKET_SIGMAS = 6.0
_BLOCK = 8
MIN_BRACKET_NUMEL = 1 << 20
_EXACT_FLOAT32_COUNT = 1 << 24

ChunkStream = Callable[[], Iterable[tuple[str, int, int, Tensor]]]


def kept_count(fraction: float, numel: int) -> int:
    """How many entries "the top `fraction`" keeps: ceil(fraction·numel), at least 1 when numel > 0."""
    if numel == 0:
        return 0
    # The small slack stops 0.2 * 5 = 1.0000000000000002 from rounding up to 2.
    return min(numel, max(1, math.ceil(fraction * numel - 1e-9)))


def shrink_lambda(threshold: float, dtype: torch.dtype) -> float:
    """λ such that ``torch.hardshrink(x, λ)`` keeps exactly |x| ≥ threshold (it keeps |x| > λ).

    The largest value of `dtype` below the threshold; 0 for a zero threshold (zeros are then dropped,
    which changes nothing in a sum).
    """
    if threshold <= 0.0:
        return 0.0
    value = torch.tensor(threshold, dtype=dtype)
    return float(torch.nextafter(value, torch.zeros((), dtype=dtype)))


def top_fraction_thresholds(
    stream: ChunkStream,
    n_tasks: int,
    numel: int,
    fraction: float,
    workspace: Workspace | None = None,
    *,
    sample: Callable[[], Tensor | None] | None = None,
    min_bracket_numel: int = MIN_BRACKET_NUMEL,
    report: dict | None = None,
) -> Tensor:
    """Per-task threshold t_i such that |τ_i| ≥ t_i keeps the ceil(fraction·numel) largest entries.

    `stream()` must yield (key, start, stop, taus[n_tasks, chunk]) and be replayable (it may be called
    up to three times and must yield the same values). `sample()`, optional, returns task-vector
    entries [n_tasks, m] drawn from the same vectors (e.g. `strided_sample`), or None; without it, a
    sample is taken from the stream (one more cheap pass). Task vectors shorter than
    `min_bracket_numel` go straight to the radix select. Returns a float64 CPU tensor [n_tasks] (0 when
    everything is kept); `report`, if given, receives "threshold_method" ("all", "bracket" or "radix")
    and "passes_over_inputs". Raises ValueError naming the key on NaN or infinite entries.
    """
    report = {} if report is None else report
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = kept_count(fraction, numel)
    if k >= numel:
        report.update(threshold_method="all", passes_over_inputs=0)
        return torch.zeros(n_tasks, dtype=torch.float64)
    workspace = workspace or Workspace()
    passes = 0
    if numel >= max(min_bracket_numel, 1):
        values = sample() if sample is not None else None
        if values is None:
            values, passes = _sample_stream(stream, numel), passes + 1
        bracket = _bracket(values, k, numel)
        if bracket is not None:
            thresholds, passes = _bracket_select(stream, n_tasks, k, bracket, workspace), passes + 1
            if thresholds is not None:
                report.update(threshold_method="bracket", passes_over_inputs=passes)
                return thresholds
    report.update(threshold_method="radix", passes_over_inputs=passes + 2)
    return _radix_select(stream, n_tasks, k, workspace)


# ---- sampling and the bracket ---------------------------------------------------------------------


def _sample_step(numel: int) -> int:
    return max(1, numel // SAMPLE_SIZE)


def strided_sample(source: TaskVectorSource, keys: Sequence[str]) -> Tensor | None:
    """Every s-th entry of the concatenated task vectors of `keys` (s = numel // SAMPLE_SIZE), [N, m].

    Reads the models directly (a strided slice per key, phase kept across keys), so it costs a small
    fraction of a pass. None when the source transforms its task vectors (DARE): the sample would not
    match what the stream yields.
    """
    if source.transform is not None:
        return None
    step = _sample_step(source.numel(keys))
    parts, position = [], 0
    for key in keys:
        ref = source.base[key]
        first = (-position) % step
        position += ref.numel()
        if first >= ref.numel():
            continue
        device, dtype = source.device_for(key), compute_dtype(ref.dtype)
        base_part = flat(ref)[first::step].to(device, dtype)
        parts.append(torch.stack([flat(m[key])[first::step].to(device, dtype) - base_part for m in source.finetuned]))
    return torch.cat(parts, dim=1) if parts else None


def _sample_stream(stream: ChunkStream, numel: int) -> Tensor | None:
    """The strided sample taken from the stream itself (costs one pass of task-vector arithmetic)."""
    step = _sample_step(numel)
    parts, position = [], 0
    for _key, start, stop, taus in stream():
        first = (-position) % step
        position += stop - start
        if first < taus.shape[1]:
            parts.append(taus[:, first::step].clone())
    return torch.cat(parts, dim=1) if parts else None


def _bracket(values: Tensor | None, k: int, numel: int) -> tuple[Tensor, Tensor, int] | None:
    """Per-task magnitudes (lo, hi) that hold the k-th largest with a BRACKET_SIGMAS margin, and how many
    entries per task the bracket should hold; None if the sample cannot give a safe bracket (too small,
    magnitudes of zero, non-float32 values)."""
    if values is None or values.dtype != torch.float32 or values.ndim != 2 or values.shape[1] == 0:
        return None
    m = values.shape[1]
    p = k / numel
    expected = p * m
    margin = BRACKET_SIGMAS * math.sqrt(m * p * (1.0 - p)) + 2.0
    rank_hi, rank_lo = math.floor(expected - margin), math.ceil(expected + margin)  # ranks from the top
    if rank_hi < 1 or rank_lo > m:
        return None
    magnitudes = values.abs()
    hi = torch.kthvalue(magnitudes, m - rank_hi + 1, dim=1).values
    lo = torch.kthvalue(magnitudes, m - rank_lo + 1, dim=1).values
    if not bool(torch.isfinite(hi).all()) or not bool((lo > 0).all()):
        return None  # non-finite entries are reported by the radix select; zeros need its exact counting
    expected_inside = math.ceil((rank_lo - rank_hi + 1) / m * numel)
    return lo.cpu(), hi.cpu(), expected_inside


# ---- bracket select -------------------------------------------------------------------------------


def _bracket_select(
    stream: ChunkStream, n_tasks: int, k: int, bracket: tuple[Tensor, Tensor, int], workspace: Workspace
) -> Tensor | None:
    """One counting pass; None when the bracket turns out not to hold the k-th largest (or holds far more
    entries than the sample promised), so that the caller falls back to the radix select."""
    lo, hi, expected_inside = bracket
    lo_lambdas = [shrink_lambda(float(v), torch.float32) for v in lo]  # keeps |τ| ≥ lo
    hi_lambdas = [float(v) for v in hi]  # keeps |τ| > hi
    limit = 4 * expected_inside + (1 << 16)  # bracket entries allowed per task before giving up
    above: Tensor | None = None
    inside: list[list[Tensor]] = [[] for _ in range(n_tasks)]
    inside_count = [0] * n_tasks
    for key, _start, _stop, taus in stream():
        if taus.numel() == 0:
            continue
        if taus.dtype != torch.float32 or taus.shape[1] > _EXACT_FLOAT32_COUNT:
            return None  # float32 dot products count exactly only up to 2^24 entries per chunk
        shape = tuple(taus.shape)
        over = workspace.get("bracket_over", shape, taus.dtype, taus.device)
        band = workspace.get("bracket_band", shape, taus.dtype, taus.device)
        for task in range(n_tasks):
            torch.hardshrink(taus[task], hi_lambdas[task], out=over[task])
            torch.hardshrink(taus[task], lo_lambdas[task], out=band[task])
        # band = entries with lo ≤ |τ| ≤ hi (and NaN wherever τ is NaN or infinite); over → its signs.
        band.sub_(over).abs_()
        over.sign_()
        counts = torch.stack([torch.dot(row, row) for row in over])
        above = counts.double() if above is None else above.add_(counts)
        for task, values in enumerate(_nonzero_entries(band, workspace)):
            if values.numel():
                if not bool(torch.isfinite(values).all()):
                    raise ValueError(f"task vector of {key!r} has NaN or infinite entries")
                inside[task].append(values)
                inside_count[task] += values.numel()
                if inside_count[task] > limit:
                    return None
    if above is None:
        return None
    if not bool(torch.isfinite(above).all()):
        return None  # non-finite counts: let the radix select find and name the key
    thresholds = torch.empty(n_tasks, dtype=torch.float64)
    for task in range(n_tasks):
        count_above = int(above[task])
        needed = k - count_above  # rank of the threshold among the bracket entries, from the top
        if not 0 < needed <= inside_count[task]:
            return None
        values = torch.cat(inside[task])
        thresholds[task] = float(torch.kthvalue(values, values.numel() - needed + 1).values)
    return thresholds


def _nonzero_entries(magnitudes: Tensor, workspace: Workspace) -> list[Tensor]:
    """Per row of a sparse, non-negative [N, C] block, its non-zero (or NaN) entries.

    Each row is viewed as _BLOCK strided slices [_BLOCK, C/_BLOCK]; a max across the slices flags the
    columns that hold any entry (a reduction over the outer dimension, which torch vectorises well),
    and only those columns are gathered before the final selection: far cheaper than
    ``masked_select`` over the whole block.
    """
    n_tasks, width = magnitudes.shape
    if width % _BLOCK:
        return [row[row != 0] for row in magnitudes]
    columns = width // _BLOCK
    slices = magnitudes.view(n_tasks, _BLOCK, columns)
    flags = workspace.get("bracket_flags", (n_tasks, columns), magnitudes.dtype, magnitudes.device)
    torch.amax(slices, dim=1, out=flags)  # NaN propagates: non-finite entries are reported, not dropped
    found = []
    for task in range(n_tasks):
        gathered = slices[task].index_select(1, flags[task].nonzero().squeeze(1))  # [_BLOCK, hits]
        found.append(gathered[gathered != 0])  # NaN != 0 too
    return found


# ---- radix select (fallback) ------------------------------------------------------------------------


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


def _radix_select(stream: ChunkStream, n_tasks: int, k: int, workspace: Workspace) -> Tensor:
    """Two-pass radix select over the float32 bit patterns of |τ| (see the module docstring)."""
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
    # bincount on one counter.
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
