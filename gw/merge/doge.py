"""DOGE (Wei et al., ICML 2025, "Modeling Multi-Task Model Merging as Adaptive Projective Gradient
Descent"), the task-arithmetic variant, following the first author's reference implementation in
FusionBench (``fusion_bench/method/doge_ta/doge_ta.py``).

For every 2-D linear weight W of the encoder (kind "matrix": not an embedding table, not a norm),
with task vectors τ_i = W_i − W₀ and r = min(rows, cols):

- λ_i = η / ‖τ_i‖_F (η = 0.07; λ_i = 0 where τ_i = 0);
- shared subspace: the top ⌊r/N⌋ left singular vectors of each τ_i, stacked side by side and
  decomposed again, keeping ⌊r/6⌋ left singular vectors B; P = BBᵀ (acts on the row index);
- one modification Δ per weight, zero at start, shared by all tasks, minimising
  Σ_j Σ_rows ⟨τ_j, τ_j − τ_m⟩² with τ_m = Σ_i λ_i (τ_i + Δ) by Adam (lr 1e-4, 400 steps, torch's
  defaults otherwise) on the projected gradient g ← (I − P) g;
- merge: θ₀ + Σ_i λ_i ((τ_i + Δ) ⊙ m_i), m_i = top 30% of |τ_i| over all DOGE weights of task i
  together (as the reference's flattened vector; exact threshold, see gw.merge._magnitude).

Where we differ from the reference, and why:

- Other parameters. The reference leaves every tensor outside its filter at θ₀ (fine-tuning lost),
  and its filter (``"encoder" in k and "layer_norm" not in k and "weight" in k``) lets BERT's
  ``LayerNorm.weight`` through as if it were a matrix. Here the kinds are explicit
  (gw.merge._state.classify_key): biases, LayerNorm weights and biases, embedding tables (word,
  position, token type) and any other non-matrix float tensor are merged by Task Arithmetic,
  θ₀ + λ_rest Σ τ_i with λ_rest = 1/N by default (the average of the fine-tunes). Buffers are copied.
- Projection of Δ. Adam rescales each entry of the projected gradient by its own √v, so the
  reference's Δ drifts into the shared subspace it means to protect. ``projection`` chooses:
  "final" (default) runs the reference's iterations and then projects Δ once, Δ ← (I − P)Δ, so the
  merge uses a Δ with no component in the subspace (PΔ = 0); "step" projects Δ after every Adam step
  (projected Adam: every iterate stays in the complement; a projection per step costs time);
  "gradient" is the reference exactly (the gradient only).
- Speed. The loss is quadratic in Δ, so the gradient is computed in closed form,
  ∇ = −2 Λ Σ_j a_j ⊙ τ_j with a_j = ⟨τ_j, τ_j − τ_m⟩ per row and Λ = Σ_i λ_i, instead of by autograd;
  weights of the same shape are optimised together in batches of at most 16 MB of task vectors (Adam
  is element-wise and the loss is a sum over weights, so this equals optimising each weight alone, as
  the reference does), with torch's fused Adam kernel (timings: docs/performance.md).
- Memory. No batch-sized temporaries: the projection is in place (``baddbmm_``), the residual constants
  are computed in the optimiser's buffers before it starts, the SVDs run one weight at a time and the
  final masked merge one weight at a time; peak memory is ~1.6x the inputs for a MiniLM-L6 trio.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gw.merge._magnitude import strided_sample, top_fraction_thresholds
from gw.merge._state import (
    KIND_BUFFER,
    KIND_MATRIX,
    StateDict,
    TaskVectorSource,
    classify_key,
    compute_dtype,
    copy_buffers,
)
from gw.merge.task_arithmetic import add_scaled_sum

PROJECTIONS = ("step", "final", "gradient")
# Upper bound on the stacked task vectors of one optimisation batch (N·L·rows·cols·4 bytes); the
# optimiser keeps about 5 more tensors of a third of that for N = 3. Small batches keep the merge's peak
# memory near inputs + output (a MiniLM-L6 trio: 9 batches, +~60 MB of working memory) at a cost of a
# few hundred small-op launches per step, not measurable next to the arithmetic.
_BATCH_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class DogeParams:
    """eta: λ_i = eta/‖τ_i‖_F; steps, lr: Adam; subspace_divisor: keep ⌊r/divisor⌋ shared directions;
    top_k: fraction of |τ_i| kept in the final merge; rest_lam: TA scaling of non-matrix tensors
    (None = 1/N); projection: "final", "step" or "gradient" (see the module docstring); device: where
    to optimise (None = the base's device if CUDA, else CUDA when available, else CPU)."""

    eta: float = 0.07
    steps: int = 400
    lr: float = 1e-4
    subspace_divisor: int = 6
    top_k: float = 0.3
    rest_lam: float | None = None
    projection: str = "final"
    device: str | None = None

    def resolved(self, n_models: int) -> dict[str, object]:
        if not (math.isfinite(self.eta) and self.eta > 0):
            raise ValueError(f"eta must be a positive number, got {self.eta}")
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if int(self.subspace_divisor) != self.subspace_divisor or self.subspace_divisor < 1:
            raise ValueError(f"subspace_divisor must be a positive integer, got {self.subspace_divisor}")
        if not 0.0 < self.top_k <= 1.0:
            raise ValueError(f"top_k is the fraction of entries kept and must be in (0, 1], got {self.top_k}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        rest_lam = 1.0 / n_models if self.rest_lam is None else float(self.rest_lam)
        if not math.isfinite(rest_lam):
            raise ValueError(f"rest_lam must be a finite number, got {self.rest_lam}")
        return {
            "eta": float(self.eta),
            "steps": int(self.steps),
            "lr": float(self.lr),
            "subspace_divisor": int(self.subspace_divisor),
            "top_k": float(self.top_k),
            "rest_lam": rest_lam,
            "projection": self.projection,
        }


@dataclass(frozen=True)
class DogeShift:
    """Result of optimising one batch of same-shape weights (L of them, N tasks, rows × cols)."""

    delta: Tensor  # [L, rows, cols], the modification Δ
    lambdas: Tensor  # [N, L], λ_i per weight
    basis: Tensor  # [L, rows, k], orthonormal basis B of the shared subspace (P = BBᵀ)
    losses: Tensor  # [steps + 1], the loss summed over the batch before each step and after the last


def doge_lambdas(taus: Tensor, eta: float) -> Tensor:
    """λ_i = eta / ‖τ_i‖_F per task and weight; taus [N, L, rows, cols] -> [N, L] (0 where τ_i = 0)."""
    norms = torch.linalg.vector_norm(taus, dim=(-2, -1))
    return torch.where(norms > 0, eta / norms.clamp_min(torch.finfo(taus.dtype).tiny), torch.zeros_like(norms))


def shared_subspace_basis(taus: Tensor, divisor: int = 6) -> Tensor:
    """Orthonormal basis [L, rows, k] of the shared subspace, k = min(⌊r/divisor⌋, N·⌊r/N⌋).

    Per task the top ⌊r/N⌋ left singular vectors of τ_i; stacked side by side; the top k left singular
    vectors of the stack.
    """
    n_tasks, n_weights, rows, cols = taus.shape
    rank = min(rows, cols)
    per_task = rank // n_tasks
    keep = min(rank // divisor, n_tasks * per_task)
    if keep == 0:
        return taus.new_zeros((n_weights, rows, 0))
    basis = taus.new_empty((n_weights, rows, keep))
    stacked = taus.new_empty((rows, n_tasks * per_task))
    for weight in range(n_weights):  # one weight at a time: SVD scratch for one matrix, not for the batch
        for task in range(n_tasks):
            left = torch.linalg.svd(taus[task, weight], full_matrices=False).U
            stacked[:, task * per_task : (task + 1) * per_task] = left[:, :per_task]
        basis[weight] = torch.linalg.svd(stacked, full_matrices=False).U[:, :keep]
    return basis


def _project_out(matrix: Tensor, basis: Tensor) -> Tensor:
    """matrix ← (I − BBᵀ) matrix, in place, batched over weights."""
    if basis.shape[-1] == 0:
        return matrix
    return matrix.baddbmm_(basis, torch.bmm(basis.transpose(1, 2), matrix), alpha=-1.0)


def _row_inner(taus: Tensor, matrix: Tensor) -> Tensor:
    """⟨τ_j[row], matrix[row]⟩ for every task, weight and row: [N, L, rows] (differentiable)."""
    return torch.einsum("jlrc,lrc->jlr", taus, matrix)


def _row_inner_into(taus: Tensor, matrix: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
    """_row_inner into reused buffers, multiply-then-sum per task: faster on CPU than einsum,
    which copies the task vectors into a matmul-friendly layout on every call."""
    for task in range(taus.shape[0]):
        torch.sum(torch.mul(taus[task], matrix, out=scratch), dim=-1, out=out[task])
    return out


def doge_residuals(taus: Tensor, lambdas: Tensor, delta: Tensor) -> Tensor:
    """a_j = ⟨τ_j, τ_j − τ_m⟩ per row with τ_m = Σ_i λ_i (τ_i + Δ); the loss is Σ a_j²."""
    merged = torch.einsum("il,ilrc->lrc", lambdas, taus) + lambdas.sum(0)[:, None, None] * delta
    return (taus * taus).sum(-1) - _row_inner(taus, merged)


def _initial_residuals(taus: Tensor, lambdas: Tensor, *, merged: Tensor, scratch: Tensor) -> Tensor:
    """doge_residuals at Δ = 0, ⟨τ_j, τ_j − Σ_i λ_i τ_i⟩ per row, using two [L, rows, cols] buffers."""
    torch.mul(taus[0], lambdas[0][:, None, None], out=merged)
    for task in range(1, taus.shape[0]):
        merged.addcmul_(taus[task], lambdas[task][:, None, None])
    out = taus.new_empty(taus.shape[:-1])
    for task in range(taus.shape[0]):
        torch.sum(torch.sub(taus[task], merged, out=scratch).mul_(taus[task]), dim=-1, out=out[task])
    return out


def loss_gradient(taus: Tensor, lambdas: Tensor, residuals: Tensor, out: Tensor | None = None) -> Tensor:
    """∂/∂Δ of Σ a_j²: −2 Λ Σ_j a_j ⊙ τ_j, each row of τ_j scaled by its residual a_j (doge_residuals)."""
    out = torch.mul(taus[0], residuals[0].unsqueeze(-1), out=out)
    for task in range(1, taus.shape[0]):
        out.addcmul_(taus[task], residuals[task].unsqueeze(-1))
    return out.mul_(-2.0 * lambdas.sum(0)[:, None, None])


def optimise_shift(
    taus: Tensor,
    *,
    eta: float = 0.07,
    steps: int = 400,
    lr: float = 1e-4,
    subspace_divisor: int = 6,
    projection: str = "final",
) -> DogeShift:
    """Optimise DOGE's Δ for a batch of same-shape weights; taus [N, L, rows, cols] (not modified).

    projection: "gradient" projects only the gradient (the reference), "final" also projects Δ once
    at the end, "step" also projects Δ after every Adam step (projected Adam; see the module docstring).
    """
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    with torch.no_grad():
        lambdas = doge_lambdas(taus, eta)
        basis = shared_subspace_basis(taus, subspace_divisor)
        total_lambda = lambdas.sum(0)[:, None]  # Λ per weight, broadcast over rows: [L, 1]
        grad, delta_buffer = torch.empty_like(taus[0]), torch.empty_like(taus[0])
        # a_j = c_j − Λ ⟨τ_j, Δ⟩ per row, with the constant part c_j = ⟨τ_j, τ_j − Σ_i λ_i τ_i⟩
        # (computed in the gradient and Δ buffers before they are used: no batch-sized temporaries).
        constant = _initial_residuals(taus, lambdas, merged=grad, scratch=delta_buffer)
        inner = torch.empty_like(constant)
        delta = torch.nn.Parameter(delta_buffer.zero_())
        # torch's Adam with its defaults, as the reference; the fused kernel is one pass over the weights.
        optimizer = torch.optim.Adam([delta], lr=lr, fused=_fused_supported(delta))
        losses = torch.empty(steps + 1, dtype=torch.float64, device=taus.device)
        for step in range(steps + 1):
            residual = constant - total_lambda * _row_inner_into(taus, delta, inner, grad)
            losses[step] = residual.square().sum()
            if step == steps:
                break
            delta.grad = _project_out(loss_gradient(taus, lambdas, residual, out=grad), basis)
            optimizer.step()
            if projection == "step":
                # Δ stays in the complement: (I − P)(Δ + s) = Δ + (I − P)s when PΔ = 0.
                _project_out(delta, basis)
        if projection == "final" and steps > 0:
            _project_out(delta, basis)
            losses[steps] = (constant - total_lambda * _row_inner_into(taus, delta, inner, grad)).square().sum()
        return DogeShift(delta=delta.detach(), lambdas=lambdas, basis=basis, losses=losses)


def _fused_supported(tensor: Tensor) -> bool:
    return tensor.device.type in ("cpu", "cuda") and tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _resolve_device(base: StateDict, keys: Sequence[str], requested: str | None) -> torch.device:
    if requested is not None:
        return torch.device(requested)
    base_device = base[keys[0]].device if keys else torch.device("cpu")
    if base_device.type == "cuda":
        return base_device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _batches(base: StateDict, keys: Sequence[str], n_models: int) -> list[list[str]]:
    """Same-shape, same-precision weights grouped into batches of at most _BATCH_BYTES of task vectors."""
    by_shape: dict[tuple, list[str]] = defaultdict(list)
    for key in keys:
        by_shape[(tuple(base[key].shape), compute_dtype(base[key].dtype))].append(key)
    batches = []
    for (shape, dtype), group in by_shape.items():
        per_weight = n_models * math.prod(shape) * torch.finfo(dtype).bits // 8
        n_batches = math.ceil(len(group) / max(1, _BATCH_BYTES // max(per_weight, 1)))
        size = math.ceil(len(group) / n_batches)  # even batches: 24 weights -> 3 x 8, not 9 + 9 + 6
        batches.extend(group[i : i + size] for i in range(0, len(group), size))
    return batches


def _stack_task_vectors(
    base: StateDict, finetuned: Sequence[StateDict], keys: Sequence[str], device: torch.device
) -> Tensor:
    ref = base[keys[0]]
    dtype = compute_dtype(ref.dtype)
    taus = torch.empty((len(finetuned), len(keys), *ref.shape), dtype=dtype, device=device)
    for index, key in enumerate(keys):
        base_weight = base[key].to(device, dtype)
        for task, model in enumerate(finetuned):
            torch.sub(model[key].to(device, dtype), base_weight, out=taus[task, index])
    return taus


def _masked_merge(base_weight: Tensor, taus: Tensor, delta: Tensor, lambdas: Tensor, thresholds: Tensor) -> Tensor:
    """θ₀ + Σ_i λ_i ((τ_i + Δ) ⊙ m_i) for one weight, m_i = [|τ_i| ≥ thresholds[i]]; taus [N, rows, cols]
    is overwritten. Returned with the base's dtype and device."""
    merged = torch.zeros_like(delta)
    keep = torch.empty_like(delta)
    for task in range(taus.shape[0]):
        torch.abs(taus[task], out=keep).ge_(float(thresholds[task]))
        merged.add_(taus[task].add_(delta).mul_(keep), alpha=float(lambdas[task]))
    merged.add_(base_weight.to(merged.device, merged.dtype))
    return merged.to(base_weight.device, base_weight.dtype)  # no copy when they already match


def merge_doge(
    base: StateDict,
    finetuned: Sequence[StateDict],
    keys: Sequence[str],
    params: DogeParams,
    *,
    seed: int = 0,  # noqa: ARG001 - deterministic; accepted for the common signature
) -> tuple[dict[str, Tensor], dict[str, object], dict[str, object]]:
    """DOGE over validated state dicts; returns (state dict, resolved params, info)."""
    n_models = len(finetuned)
    resolved = params.resolved(n_models)
    started = time.perf_counter()
    kinds = {key: classify_key(key, base[key]) for key in keys}
    matrix_keys = [k for k in keys if kinds[k] == KIND_MATRIX]
    rest_keys = [k for k in keys if kinds[k] not in (KIND_MATRIX, KIND_BUFFER)]
    device = _resolve_device(base, keys, params.device)
    out: dict[str, Tensor] = {}
    loss_curve = torch.zeros(resolved["steps"] + 1, dtype=torch.float64)
    lambdas_by_key: dict[str, list[float]] = {}
    subspace_rank: dict[str, int] = {}
    thresholds = torch.zeros(n_models, dtype=torch.float64)
    with torch.no_grad():
        add_scaled_sum(TaskVectorSource(base, finetuned), rest_keys, resolved["rest_lam"], out)
        if matrix_keys:
            source = TaskVectorSource(base, finetuned, device=device)
            thresholds = top_fraction_thresholds(
                lambda: source.chunks(matrix_keys), n_models, source.numel(matrix_keys), resolved["top_k"],
                sample=lambda: strided_sample(source, matrix_keys),
            )
        for batch in _batches(base, matrix_keys, n_models):
            taus = _stack_task_vectors(base, finetuned, batch, device)
            shift = optimise_shift(
                taus,
                eta=resolved["eta"],
                steps=resolved["steps"],
                lr=resolved["lr"],
                subspace_divisor=resolved["subspace_divisor"],
                projection=resolved["projection"],
            )
            loss_curve += shift.losses.cpu()
            subspace_rank["x".join(map(str, base[batch[0]].shape))] = int(shift.basis.shape[-1])
            # θ₀ + Σ_i λ_i ((τ_i + Δ) ⊙ m_i), weight by weight: one weight-sized mask and sum at a time.
            for index, key in enumerate(batch):
                out[key] = _masked_merge(base[key], taus[:, index], shift.delta[index], shift.lambdas[:, index],
                                         thresholds)
                lambdas_by_key[key] = [float(v) for v in shift.lambdas[:, index]]
            del taus, shift
    copy_buffers(base, [k for k in keys if kinds[k] == KIND_BUFFER], out)
    curve = [float(v) for v in loss_curve]
    info: dict[str, object] = {
        "device": str(device),
        "n_doge_keys": len(matrix_keys),
        "n_task_arithmetic_keys": len(rest_keys),
        "loss_curve": curve,
        "initial_loss": curve[0],
        "final_loss": curve[-1],
        "subspace_rank": subspace_rank,
        "lambdas": lambdas_by_key,
        "mask_thresholds": [float(t) for t in thresholds],
        "seconds": round(time.perf_counter() - started, 3),
    }
    return {k: out[k] for k in keys}, resolved, info
