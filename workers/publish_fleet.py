"""Write a consolidated fleet under an immutable run prefix and publish it atomically.

Run layout (`published/<run>/`, then `_MANIFEST.json` written last, then `LATEST`):
    groups/<group>/          a consolidated checkpoint (DESIGN §4) for each accepted merged group
    items/<item>/            the same format for each item kept on its own scorer (its backbone, its head)
The manifest's routing maps item -> {checkpoint, head}; `storage` holds the bytes before and after.
Sizes count weights only (model.safetensors and head files): configs and tokenizers are noise next to them.
"""
from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from infra.manifest import FleetManifest
from infra.publish import publish_run
from infra.storage import Store
from workers.multihead import MultiHeadScorer, save_consolidated


def weights_bytes_before(store: Store, manifest: FleetManifest, items: Sequence[str]) -> int:
    """Bytes of the scorer checkpoints the fleet serves today (one full encoder per item)."""
    return sum(store.size(f"{manifest.scorer(i).checkpoint.rstrip('/')}/model.safetensors") for i in items)


def publish_consolidated(store: Store, run_id: str, checkpoints: Mapping[str, tuple[MultiHeadScorer, Mapping]],
                         tokenizer, *, bytes_before: int, extra: Mapping | None = None) -> dict:
    """Publish `checkpoints` (name -> (model, meta)); names starting with "items/" or "groups/".

    Returns the published manifest (with routing and storage accounting).
    """
    routing: dict[str, dict] = {}
    for name, (model, _) in checkpoints.items():
        if not name.startswith(("groups/", "items/")):
            raise ValueError(f"checkpoint name {name!r} must start with groups/ or items/")
        for item in model.heads:
            if item in routing:
                raise ValueError(f"item {item} is routed twice ({routing[item]['checkpoint']} and {name})")
            routing[item] = {"checkpoint": name, "head": f"{name}/heads/{item}.safetensors",
                             "task": model.items[item]["task"], "labels": model.items[item]["labels"]}

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)
        for name, (model, meta) in checkpoints.items():
            save_consolidated(staged / name, model, tokenizer, meta)
        backbones = sum(f.stat().st_size for f in staged.glob("*/*/backbone/model.safetensors"))
        heads = sum(f.stat().st_size for f in staged.glob("*/*/heads/*.safetensors"))
        total = backbones + heads
        storage = {"bytes_before": bytes_before, "bytes_after": total, "backbone_bytes": backbones,
                   "head_bytes": heads, "ratio": round(bytes_before / total, 3) if total else None,
                   "n_backbones": len(checkpoints), "n_items": len(routing)}
        return publish_run(store, run_id, lambda prefix: store.upload_dir(staged, prefix), routing=routing,
                           extra={**(extra or {}), "storage": storage})
