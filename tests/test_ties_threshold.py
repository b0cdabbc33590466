"""Suggested additions to tests/test_merge.py: the bracket select (fast exact thresholds) path."""
import pytest
import torch

from gw.merge import merge
from gw.merge._magnitude import kept_count, strided_sample, top_fraction_thresholds
from gw.merge._state import TaskVectorSource


def _models(kind: str, n: int = 40_000, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    base = {"a.weight": torch.zeros(n // 4, 2), "b.bias": torch.zeros(n // 2)}
    models = []
    for _ in range(3):
        model = {k: torch.randn(v.shape, generator=generator) for k, v in base.items()}
        if kind == "ties":  # quantised values: the bracket collapses and the radix select takes over
            model = {k: (v * 2).round() / 2 for k, v in model.items()}
        if kind == "sparse":  # mostly exact zeros, as in never-updated embedding rows
            model = {k: v * (torch.rand(v.shape, generator=generator) < 0.3) for k, v in model.items()}
        models.append(model)
    return base, models


@pytest.mark.parametrize("kind", ["normal", "ties", "sparse"])
@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.9])
@pytest.mark.parametrize("with_sample", [True, False])
def test_bracket_select_is_exact_or_falls_back(kind, fraction, with_sample):
    base, models = _models(kind)
    source = TaskVectorSource(base, models, chunk=4096)
    keys = list(base)
    numel = source.numel(keys)
    report: dict = {}
    thresholds = top_fraction_thresholds(
        lambda: source.chunks(keys), 3, numel, fraction, min_bracket_numel=0, report=report,
        sample=(lambda: strided_sample(source, keys)) if with_sample else None)
    assert report["threshold_method"] in ("bracket", "radix")
    k = kept_count(fraction, numel)
    for task, model in enumerate(models):
        magnitudes = torch.cat([model[key].abs().reshape(-1) for key in keys])
        assert float(thresholds[task]) == float(torch.kthvalue(magnitudes, numel - k + 1).values)


def test_bracket_select_names_the_key_of_a_non_finite_entry():
    base, models = _models("normal")
    models[2]["a.weight"][7, 1] = float("inf")
    source = TaskVectorSource(base, models, chunk=4096)
    with pytest.raises(ValueError, match="a.weight"):
        top_fraction_thresholds(lambda: source.chunks(list(base)), 3, source.numel(list(base)), 0.2,
                                min_bracket_numel=0, sample=lambda: strided_sample(source, list(base)))


def test_ties_takes_the_bracket_path_on_large_vectors():
    generator = torch.Generator().manual_seed(1)
    base = {"encoder.layer.0.intermediate.dense.weight": torch.randn(1200, 1000, generator=generator)}
    models = [{k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.items()} for _ in range(2)]
    result = merge("ties", base, models)
    assert result.info["threshold_method"] == "bracket" and result.info["passes_over_inputs"] == 2
