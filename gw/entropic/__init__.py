"""Our entropic GW solver: factored squared-Euclidean costs, stabilised Sinkhorn, torch, CPU or CUDA.

The iteration is POT's ``entropic_gromov_wasserstein`` (projected gradient; Peyré, Cuturi & Solomon
2016): ``T <- Sinkhorn(p, q, grad(T), epsilon)`` with ``grad(T) = 2 L(C1, C2) (x) T``, which for the
square loss is ``-4 C1 T C2`` plus terms of the form ``u 1^T + 1 v^T`` (Sinkhorn absorbs those into
its potentials, so they are dropped). Same epsilon, same fixed points, same reported objective.

Products. With ``C = a 1^T + 1 a^T - 2 X X^T`` (``a_i = |x_i|^2``, centred points), everything the
iteration needs comes from ``Z = [X, a, 1]^T T [Y, b, 1]`` ([d + 2, e + 2]): the next gradient is
``[X, a] M [Y, b]^T`` with a small M built from Z, and ``<C1 T C2, T>`` is a closed form in Z. Two
products of O(N M d) per iteration instead of O(N^2 M). For clouds smaller than about 1.6 d the dense
product ``C1 T C2`` is cheaper and is used instead (``representation="auto"``).

Sinkhorn. Scaling form (two matrix-vector products per iteration) with log-domain stabilisation:
each solve starts by normalising the columns of the log-kernel (so no entry overflows; on large CPU
pairs by each column's maximum, the first half-step then starting from ``log q - log colsum``;
exponents are floored at -87, where a CPU ``exp`` would otherwise take its slow underflow path); scalings that
leave [e^-30, e^30] are absorbed into the potentials and the rows renormalised by a log-sum-exp
(Schmitzer 2019), which also recovers rows that underflowed. Potentials are warm started from the
previous outer iteration. Over-relaxation (Thibault et al. 2017; weight 1.8 after 10 plain
iterations, back to plain for a pair whose marginal error blows up) cuts the iterations on
clustered clouds, where plain Sinkhorn crawls while mass moves between weakly coupled clusters.
A pair whose error falls by less than 10% over 50 iterations has stalled and stops there. CPU
float32 denormals are flushed during a solve (they slow the products). The exact value's
self terms ``sum C^2 r r`` come from a per-cloud ``C * C`` (clouds of at most 1024 points).

Start. ``init="multiscale"`` (the default for clouds of >= 64 points) quantises both clouds by
weighted k-means (about 2 sqrt(N) clusters, :func:`gw.clouds.coarsen`), solves the small pair with
block-averaged costs from ``p q^T``, and lifts its coupling and potentials to the full pair; the full
iteration then typically needs 2-4 steps instead of 6-15. ``init="product"`` starts from ``p q^T``
as POT does. Both converge to fixed points of the same iteration; on a non-convex problem they may
reach different ones (on the benchmark's planted clouds our values were within 0.3% of POT's
entropic solver at the same epsilon).

Stopping. Outer iterations stop when the objective's relative change is below ``tol`` (relative to
``max(|value|, 1% of sum C1^2 pp + sum C2^2 qq)`` so near-zero values stop too; the objective of
each coupling with its own marginals), the coupling moved less than ``coupling_tol`` in total
variation since the last or the second-to-last iteration (on plateaus the objective stalls while
the coupling still turns; inexact projections can make the iteration alternate between two nearby
couplings), and the marginal error is below ``marginal_tol`` (or Sinkhorn stalled: then
``converged`` is False, and ``marginal_error`` says by how much). Never on the first step.
Sinkhorn's own tolerance follows the objective: loose (1e-2) while it still moves, ``marginal_tol``
once it settles.

Batches. Pairs of equal shapes are solved together. On CPU, large pairs (>= 128 x 128) run their
Sinkhorn solves pair after pair, each kernel built by one product from the state and kept in
cache across the iterations of its solve (memory-bound: batch-wide sweeps streamed every kernel
twice per iteration); small pairs (the multiscale start's coarse problems) run batched, their
matrix-vector products as broadcast products and row sums, stopped pairs leaving the working set
once they are half of it. Other matrix products run pair by pair (a batched CPU ``bmm`` is slow
for vectors and its bits depend on the batch). On CUDA everything is batched. On CPU a pair's
result is bit-for-bit the same whatever its batch mates and position (per-pair slices are kept
64-byte aligned: CPU kernels round differently on unaligned data), which the exact-tau skipping
of :mod:`gw.matrix` relies on.

Threads. Many small solves on a shared CPU run best with ``OMP_WAIT_POLICY=PASSIVE`` in the
environment (set before torch loads): idle OpenMP workers then sleep instead of spinning, which
otherwise burns CPU and starves the main thread. Measured effects of these choices: docs/performance.md.

Modules: ``options`` (:class:`EntropicOptions`), ``products`` (the dense and factored products),
``sinkhorn`` (the two Sinkhorn loops and their one stopping rule), ``solve`` (the entry points, the
outer iteration and the multiscale start).

Pure math: torch; no I/O.
"""

from .options import DEFAULT_EPSILON, SOLVER_REVISION, EntropicOptions
from .products import _exp, _logsumexp, self_cost_sq
from .solve import SQ_COSTS_MAX_POINTS, check_pair, entropic_gw, entropic_gw_batch, use_dense

__all__ = [
    "DEFAULT_EPSILON",
    "SOLVER_REVISION",
    "SQ_COSTS_MAX_POINTS",
    "EntropicOptions",
    "check_pair",
    "entropic_gw",
    "entropic_gw_batch",
    "self_cost_sq",
    "use_dense",
]
