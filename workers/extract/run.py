"""One scorer, end to end: plan, reuse a cached file or load the scorer, extract, check and write."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from infra.manifest import ScorerSpec
from infra.storage import Store
from workers.scorer_io import Scorer, ScorerLoadError, default_device, has_tokenizer, load_scorer

from .config import ExtractConfig, FeatureRef
from .encoder import check_spread, extract_features, model_device, precision_name
from .files import cached_ref, write_features
from .keys import FEATURES_PREFIX
from .sampling import plan_extraction


def load_spec_scorer(store: Store, spec: ScorerSpec, device: str, *, base_model: str | None = None) -> Scorer:
    """Load a scorer from the store (S3 checkpoints are downloaded to a temporary directory first).

    `base_model`, when given, supplies the tokenizer of a scorer directory that ships none.
    """
    try:
        with ExitStack() as stack:
            path = stack.enter_context(store.sub(spec.checkpoint).local_dir(""))
            fallback: Path | None = None
            if base_model is not None and not has_tokenizer(path):  # on S3 the base is fetched only if needed
                fallback = stack.enter_context(store.sub(base_model).local_dir(""))
            return load_scorer(path, task=spec.task, device=device, tokenizer_fallback=fallback)
    except Exception as exc:  # e.g. safetensors' own error on a corrupt file, which is not a ValueError
        raise ScorerLoadError(f"scorer {spec.id}: cannot load checkpoint {spec.checkpoint}: "
                              f"{type(exc).__name__}: {exc}") from None


def extract_for_spec(store: Store, spec: ScorerSpec, config: ExtractConfig = ExtractConfig(),
                     device: str | None = None, *, base_model: str | None = None, prefix: str = FEATURES_PREFIX,
                     force: bool = False) -> FeatureRef:
    """Features of one scorer over its own responses, written to the store; reused when already there.

    `device` defaults to CUDA when available. `force` recomputes and overwrites an existing file.
    """
    plan = plan_extraction(store, spec, config, prefix=prefix)
    if not force:
        ref = cached_ref(store, plan)
        if ref is not None:
            return ref
    device = device or default_device()
    scorer = load_spec_scorer(store, spec, device, base_model=base_model)
    vectors = extract_features(scorer, plan.texts, config)
    check_spread(vectors, spec.id, config)
    used = model_device(scorer.model)
    return write_features(store, plan, vectors, config, device=str(used), precision=precision_name(used, config))
