"""Save consolidated checkpoints to a store and publish a fleet of them atomically.

Checkpoints are first saved under their own content-addressed prefixes (e.g. `candidates/<key>/`),
so a rerun reuses them. Publishing copies the chosen ones under an immutable run prefix:
    published/<run>/groups/<group>/   an accepted merged group (docs/architecture.md §3.2, consolidated format)
    published/<run>/items/<item>/     an item kept on its own scorer, in the same format
then writes `_MANIFEST.json` last (routing item -> checkpoint + head, storage accounting) and moves
`LATEST`. Sizes count weights only (model.safetensors, head files and per-item adapters' weights):
configs and tokenizers are noise next to them.
"""
from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from infra.manifest import FleetManifest
from infra.peft_format import ADAPTER_WEIGHTS
from infra.publish import publish_run
from infra.storage import Store
from workers.multihead import MultiHeadScorer, save_consolidated


def save_checkpoint(store: Store, prefix: str, model: MultiHeadScorer, tokenizer, meta: Mapping | None = None) -> str:
    """Write a consolidated checkpoint under `prefix` (consolidated.json last, so its presence means complete)."""
    with tempfile.TemporaryDirectory() as tmp:
        save_consolidated(Path(tmp), model, tokenizer, meta)
        marker = Path(tmp) / "consolidated.json"
        body = marker.read_bytes()
        marker.unlink()
        store.delete(prefix)
        store.upload_dir(Path(tmp), prefix)
        store.write_bytes(f"{prefix}/consolidated.json", body)
    return prefix


def checkpoint_digests(store: Store, prefix: str) -> dict[str, str]:
    """The sha256 of each file of a saved checkpoint, by its key below `prefix` (what a reuse checks)."""
    return {key[len(prefix) + 1:]: store.size_and_sha256(key)[1] for key in store.list(prefix)}


def weights_bytes_before(store: Store, manifest: FleetManifest, items: Sequence[str]) -> int:
    """Bytes of the scorer checkpoints the fleet serves today (one full encoder per item)."""
    return sum(store.size(f"{manifest.scorer(i).checkpoint.rstrip('/')}/model.safetensors") for i in items)


def checkpoint_weights(store: Store, prefix: str) -> tuple[int, int, int]:
    """(backbone bytes, head bytes, adapter bytes) of a saved consolidated checkpoint."""
    sizes = store.list_sizes(prefix)
    backbone = sum(s for k, s in sizes.items() if k.endswith("backbone/model.safetensors"))
    heads = sum(s for k, s in sizes.items() if "/heads/" in k and k.endswith(".safetensors"))
    adapters = sum(s for k, s in sizes.items() if "/adapters/" in k and k.endswith(f"/{ADAPTER_WEIGHTS}"))
    return backbone, heads, adapters


def publish_consolidated(store: Store, run_id: str, sources: Mapping[str, str], *, bytes_before: int,
                         extra: Mapping | None = None, token: str | None = None) -> dict:
    """Publish saved checkpoints: `sources` maps a name (groups/<g> or items/<i>) to its prefix in `store`.

    `token` names the publisher (`infra.publish.publish_run`): a retry passes the same one."""
    routing: dict[str, dict] = {}
    backbones = heads = adapters = 0
    for name, prefix in sources.items():
        if not name.startswith(("groups/", "items/")):
            raise ValueError(f"checkpoint name {name!r} must start with groups/ or items/")
        doc = store.read_json(f"{prefix}/consolidated.json")
        for item, schema in doc["items"].items():
            if item in routing:
                raise ValueError(f"item {item} is routed twice ({routing[item]['checkpoint']} and {name})")
            routing[item] = {"checkpoint": name, "head": f"{name}/{schema['head']}", "task": schema["task"],
                             "labels": schema["labels"]}
            if "adapter" in schema:
                routing[item]["adapter"] = f"{name}/{schema['adapter']}"
        b, h, a = checkpoint_weights(store, prefix)
        backbones, heads, adapters = backbones + b, heads + h, adapters + a
    total = backbones + heads + adapters
    storage = {"bytes_before": bytes_before, "bytes_after": total, "backbone_bytes": backbones, "head_bytes": heads,
               "adapter_bytes": adapters, "n_adapters": sum("adapter" in r for r in routing.values()),
               "ratio": round(bytes_before / total, 3) if total else None, "n_backbones": len(sources),
               "n_items": len(routing)}

    def copy(run: str) -> None:
        for name, prefix in sources.items():
            for key in store.list(prefix):
                store.write_bytes(f"{run}/{name}/{key[len(prefix) + 1:]}", store.read_bytes(key))

    return publish_run(store, run_id, copy, routing=routing, extra={**(extra or {}), "storage": storage}, token=token)
