"""State-dict plumbing shared by the merge methods: validation, key kinds, chunked task vectors.

Every method reads the backbone key by key and, inside a key, chunk by chunk (``CHUNK_NUMEL`` entries
per model), so the working set stays a few megabytes whatever the model size and the task vectors are
never materialised all at once.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

StateDict = Mapping[str, Tensor]

# 256K entries per model per chunk: large enough that per-op overhead is negligible, small enough that
# one model's float32 chunk (1 MB) stays in a core's L2 cache (docs/performance.md).
CHUNK_NUMEL = 1 << 18

KIND_MATRIX = "matrix"  # 2-D weight of a linear map inside the encoder
KIND_NORM = "norm"  # LayerNorm (or other norm) weight / bias
KIND_BIAS = "bias"  # bias of a linear map
KIND_EMBEDDING = "embedding"  # embedding table (word, position, token type, relative position)
KIND_OTHER = "other"  # any other floating tensor (1-D scales, 3-D+ weights)
KIND_BUFFER = "buffer"  # non-floating tensor (e.g. position ids); must be identical, copied from base

_LN_COMPONENT = re.compile(r"^ln(_\w+|\d*)$")


def classify_key(key: str, tensor: Tensor) -> str:
    """Return the kind of a backbone parameter from its name and tensor (prefix-agnostic).

    Norms are recognised by a module name containing ``norm`` (``LayerNorm``, ``layer_norm``,
    ``sa_layer_norm``) or GPT-style ``ln_*``; embeddings by a module name containing ``embed``.
    """
    if not tensor.is_floating_point():
        return KIND_BUFFER
    modules = key.lower().split(".")[:-1]
    leaf = key.lower().rsplit(".", 1)[-1]
    if any("norm" in part or _LN_COMPONENT.match(part) for part in modules):
        return KIND_NORM
    if any("embed" in part for part in modules) and tensor.ndim == 2:
        return KIND_EMBEDDING
    if leaf == "bias":
        return KIND_BIAS
    if tensor.ndim == 2:
        return KIND_MATRIX
    return KIND_OTHER


def validate_state_dicts(base: StateDict, finetuned: Sequence[StateDict]) -> list[str]:
    """Check that every fine-tuned state dict matches the base; return the base's keys in order.

    Raises ValueError naming the model index and the key on missing or extra keys, shape or dtype
    mismatches, and on non-floating tensors (buffers) that differ from the base.
    """
    if not isinstance(base, Mapping) or len(base) == 0:
        raise ValueError("base must be a non-empty mapping of parameter name -> tensor")
    if isinstance(finetuned, Mapping) or len(finetuned) == 0:
        raise ValueError("finetuned must be a non-empty sequence of state dicts (one per model)")
    keys = list(base.keys())
    for key in keys:
        if not isinstance(base[key], Tensor):
            raise ValueError(f"base[{key!r}] is {type(base[key]).__name__}, expected a torch.Tensor")
    key_set = set(keys)
    for index, model in enumerate(finetuned):
        if not isinstance(model, Mapping):
            raise ValueError(f"finetuned[{index}] is {type(model).__name__}, expected a state dict")
        missing = key_set - model.keys()
        extra = model.keys() - key_set
        if missing or extra:
            raise ValueError(
                f"finetuned[{index}] has different keys from base: missing {_preview(missing)}, "
                f"extra {_preview(extra)} (pass backbone keys only, with the same prefix as base)"
            )
        for key in keys:
            ref, other = base[key], model[key]
            if not isinstance(other, Tensor):
                raise ValueError(f"finetuned[{index}][{key!r}] is {type(other).__name__}, expected a tensor")
            if other.shape != ref.shape:
                raise ValueError(
                    f"shape mismatch for {key!r}: base {tuple(ref.shape)}, finetuned[{index}] {tuple(other.shape)}"
                )
            if other.dtype != ref.dtype:
                raise ValueError(f"dtype mismatch for {key!r}: base {ref.dtype}, finetuned[{index}] {other.dtype}")
            if not ref.is_floating_point() and not torch.equal(ref, other.to(ref.device)):
                raise ValueError(
                    f"non-floating tensor {key!r} differs between base and finetuned[{index}]; "
                    "buffers cannot be merged"
                )
    return keys


def _preview(keys: Iterable[str], limit: int = 5) -> str:
    ordered = sorted(keys)
    shown = ", ".join(repr(k) for k in ordered[:limit])
    more = f" and {len(ordered) - limit} more" if len(ordered) > limit else ""
    return f"[{shown}{more}]"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic precision for a stored dtype: float32, or float64 for float64 checkpoints."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def flat(tensor: Tensor) -> Tensor:
    """A 1-D view (a copy only when the tensor is not contiguous)."""
    return tensor.reshape(-1)


def chunk_bounds(numel: int, chunk: int = CHUNK_NUMEL) -> Iterator[tuple[int, int]]:
    """(start, stop) pairs covering range(numel); one empty pair for an empty tensor."""
    if numel == 0:
        yield 0, 0
        return
    for start in range(0, numel, chunk):
        yield start, min(start + chunk, numel)


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from its parts, identical across processes and Python versions."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Workspace:
    """Reusable scratch buffers for the chunk loops.

    Fresh multi-megabyte tensors are served by mmap and page-faulted on every allocation, which costs
    more than the arithmetic here; every chunk-sized temporary therefore lives in a buffer reused for
    the whole merge. `get` returns a contiguous view that stays valid until the next `get` of that name.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        numel = 1
        for size in shape:
            numel *= size
        key = (name, dtype, torch.device(device))
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer[:numel].view(shape)


@dataclass(frozen=True)
class DropRescale:
    """DARE's transform: drop each task-vector entry with probability p, rescale survivors by 1/(1-p).

    The mask of (task, key, chunk) comes from its own generator seeded from (seed, task, key, start),
    so every pass over the task vectors sees the same mask and results do not depend on key order.
    """

    p: float
    seed: int

    def apply(self, key: str, start: int, taus: Tensor, workspace: Workspace) -> Tensor:
        if self.p == 0.0 or taus.numel() == 0:
            return taus
        scale = 1.0 / (1.0 - self.p)
        draws = workspace.get("dare_draws", (taus.shape[1],), torch.float32, taus.device)
        for task in range(taus.shape[0]):
            generator = torch.Generator(device=taus.device)
            generator.manual_seed(stable_seed("dare", self.seed, task, key, start))
            torch.rand(draws.shape, generator=generator, out=draws)
            # draws -> 0 where dropped (u < p), 1/(1-p) where kept; float masks avoid slow bool tensors.
            taus[task].mul_(draws.ge_(self.p).mul_(scale))
        return taus


class TaskVectorSource:
    """Streams task vectors τ_i = θ_i − θ₀ chunk by chunk as an [N, chunk] tensor in compute precision.

    The yielded block is a reused buffer: it is valid until the next iteration and may be modified in
    place by the consumer.
    """

    def __init__(
        self,
        base: StateDict,
        finetuned: Sequence[StateDict],
        *,
        device: torch.device | None = None,
        transform: DropRescale | None = None,
        chunk: int = CHUNK_NUMEL,
        workspace: Workspace | None = None,
    ) -> None:
        self.base = base
        self.finetuned = finetuned
        self.transform = transform
        self.chunk = chunk
        self.workspace = workspace or Workspace()
        self._device = device
        self._flat_base: tuple[str, Tensor] | None = None  # last key's flattened base (a copy if strided)

    @property
    def n_models(self) -> int:
        return len(self.finetuned)

    def device_for(self, key: str) -> torch.device:
        return self._device if self._device is not None else self.base[key].device

    def numel(self, keys: Iterable[str]) -> int:
        return sum(self.base[key].numel() for key in keys)

    def base_chunk(self, key: str, start: int, stop: int) -> Tensor:
        """θ₀[start:stop] of the flattened key on the compute device, in compute precision.

        May be a view of the base itself: read it, never write to it.
        """
        if self._flat_base is None or self._flat_base[0] != key:
            self._flat_base = (key, flat(self.base[key]))
        return self._flat_base[1][start:stop].to(self.device_for(key), compute_dtype(self.base[key].dtype))

    def write_base_plus(self, key: str, start: int, stop: int, delta: Tensor, alpha: float, out: Tensor) -> None:
        """out[start:stop] (flattened) = θ₀[start:stop] + alpha · delta, cast to out's dtype and device.

        Never writes into the base: the sum goes straight into `out` when dtypes and devices agree,
        otherwise into `delta` (a temporary owned by the caller) and is then copied.
        """
        target = flat(out)[start:stop]
        base_part = self.base_chunk(key, start, stop)
        if target.dtype == delta.dtype and target.device == delta.device:
            torch.add(base_part, delta, alpha=alpha, out=target)
        else:
            target.copy_(delta.mul_(alpha).add_(base_part))

    def chunks(self, keys: Iterable[str]) -> Iterator[tuple[str, int, int, Tensor]]:
        """Yield (key, start, stop, taus) with taus[i] = (θ_i − θ₀)[start:stop] of the flattened key."""
        for key in keys:
            ref = self.base[key]
            device, dtype = self.device_for(key), compute_dtype(ref.dtype)
            base_flat = flat(ref)
            model_flats = [flat(model[key]) for model in self.finetuned]
            for start, stop in chunk_bounds(ref.numel(), self.chunk):
                base_part = base_flat[start:stop].to(device, dtype)
                taus = self.workspace.get("taus", (self.n_models, stop - start), dtype, device)
                for index, model_flat in enumerate(model_flats):
                    torch.sub(model_flat[start:stop].to(device, dtype), base_part, out=taus[index])
                if self.transform is not None:
                    self.transform.apply(key, start, taus, self.workspace)
                yield key, start, stop, taus


def sum_rows(block: Tensor, out: Tensor) -> Tensor:
    """block.sum(0) of an [N, chunk] block into `out`, by row adds (faster on CPU than a dim-0 reduction)."""
    if block.shape[0] == 1:
        return out.copy_(block[0])
    torch.add(block[0], block[1], out=out)
    for row in block[2:]:
        out.add_(row)
    return out


def copy_buffers(base: StateDict, keys: Iterable[str], out: dict[str, Tensor]) -> None:
    """Copy non-floating tensors (validated identical across models) from the base."""
    for key in keys:
        out[key] = base[key].clone()


def allocate_like(base: StateDict, key: str) -> Tensor:
    """A contiguous output tensor with the base's shape, dtype and device."""
    ref = base[key]
    return torch.empty(ref.shape, dtype=ref.dtype, device=ref.device)
