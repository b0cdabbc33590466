"""Build a scorer fleet: fine-tune one scorer per item and write the fleet manifest.

Layout written to the output store (every path in the manifest is relative to it):
    base/                    the pretrained encoder every scorer starts from (task vectors are against it)
    responses/<item>.parquet response_id, text, label | labels, split
    scorers/<item>/          a Hugging Face directory (config.json, model.safetensors, tokenizer files)
    scorers/<item>/fleetmerge_build.json   what it was built from; written last, so a rebuild can reuse it
    fleet.yaml               the manifest, written after every scorer
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from gw.keys import content_key
from infra.manifest import FleetManifest, ScorerSpec, save_manifest
from infra.storage import Store
from workers.finetune import FinetuneConfig, finetune_scorer
from workers.scorer_io import TOKENIZER_FILES, WEIGHTS_FILE, default_device, file_sha256

BUILD_RECORD = "fleetmerge_build.json"
BASE_FILES = ("config.json", WEIGHTS_FILE, *TOKENIZER_FILES)


@dataclass(frozen=True)
class ItemInfo:
    item_id: str
    task: str = "multiclass"
    label_names: tuple[str, ...] = ()
    description: str | None = None
    module: str | None = None


def load_items(path: str | Path) -> dict[str, ItemInfo]:
    """Read items.jsonl (item_id, label_names, optional task, question/description, module)."""
    items = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            items[raw["item_id"]] = ItemInfo(raw["item_id"], raw.get("task", "multiclass"), tuple(raw["label_names"]),
                                             raw.get("description") or raw.get("question"), raw.get("module"))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: bad item line ({exc})") from None
    return items


def item_seed(seed: int, item_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{item_id}".encode()).digest()[:4], "little")


def item_responses(responses: pa.Table, info: ItemInfo) -> pa.Table:
    """One item's rows in the fleet's responses format."""
    rows = responses.filter(pc.equal(responses.column("item_id"), info.item_id))
    label_column = "labels" if info.task == "multilabel" else "label"
    if label_column not in rows.column_names:
        raise ValueError(f"item {info.item_id}: responses lack the column {label_column!r} for a {info.task} item")
    return rows.select(["response_id", "text", label_column, "split"])


def copy_base(base_dir: Path, out: Store, prefix: str = "base") -> str:
    for name in BASE_FILES:
        if (base_dir / name).is_file():
            out.write_bytes(f"{prefix}/{name}", (base_dir / name).read_bytes())
    return prefix


def _build_key(base_hash: str, table: pa.Table, info: ItemInfo, config: FinetuneConfig) -> str:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    settings = json.dumps([info.task, list(info.label_names), config.to_dict()], sort_keys=True)
    return content_key(base_hash, sink.getvalue().to_pybytes(), settings, length=32)


def build_fleet(responses: pa.Table, items: Mapping[str, ItemInfo], base_dir: str | Path, out: Store, *,
                fleet_name: str = "fleet", config: FinetuneConfig = FinetuneConfig(), device: str | None = None,
                item_ids: Sequence[str] | None = None, reuse: bool = True, progress: bool = True,
                log: Callable[[str], None] = print) -> tuple[FleetManifest, dict]:
    """Fine-tune a scorer per item and write the fleet; returns (manifest, build summary)."""
    base_dir = Path(base_dir)
    device = device or default_device()
    ids = list(item_ids) if item_ids is not None else sorted(set(responses.column("item_id").to_pylist()))
    unknown = [i for i in ids if i not in items]
    if unknown:
        raise ValueError(f"items without metadata (add them to items.jsonl): {unknown}")
    base_hash = file_sha256(base_dir / WEIGHTS_FILE)
    base_ref = copy_base(base_dir, out)
    specs, summary = [], {"built": [], "reused": [], "seconds": {}}
    for item_id in ids:
        info = items[item_id]
        table = item_responses(responses, info)
        responses_key = f"responses/{item_id}.parquet"
        out.write_table(responses_key, table)
        item_config = FinetuneConfig(**{**config.to_dict(), "seed": item_seed(config.seed, item_id)})
        key = _build_key(base_hash, table, info, item_config)
        record_key = f"scorers/{item_id}/{BUILD_RECORD}"
        specs.append(ScorerSpec(id=item_id, checkpoint=f"scorers/{item_id}", responses=responses_key, task=info.task,
                                labels=list(info.label_names), description=info.description, module=info.module))
        if reuse and out.exists(record_key) and out.read_json(record_key).get("key") == key:
            summary["reused"].append(item_id)
            continue
        started = time.perf_counter()
        train = table.filter(pc.equal(table.column("split"), "train"))
        label_column = "labels" if info.task == "multilabel" else "label"
        bar = tqdm(total=None, desc=f"fine-tune {item_id}", unit="step", disable=None if progress else True, leave=False)

        def on_step(step: int, total: int, loss: float) -> None:
            bar.total = total
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

        model, tokenizer, history = finetune_scorer(
            base_dir, train.column("text").to_pylist(), train.column(label_column).to_pylist(), task=info.task,
            label_names=info.label_names, config=item_config, device=device, on_step=on_step)
        bar.close()
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            out.delete(f"scorers/{item_id}")
            out.upload_dir(Path(tmp), f"scorers/{item_id}")
        seconds = time.perf_counter() - started
        out.write_json(record_key, {"key": key, "base_sha256": base_hash, "config": item_config.to_dict(),
                                    "n_train": train.num_rows, "final_loss": history[-1] if history else None,
                                    "seconds": round(seconds, 2), "device": device})
        summary["built"].append(item_id)
        summary["seconds"][item_id] = round(seconds, 2)
        log(f"built scorer {item_id}: {train.num_rows} training responses, {seconds:.1f} s, final loss {history[-1]:.3f}")
    manifest = FleetManifest(fleet=fleet_name, base_model=base_ref, scorers=specs)
    save_manifest(out, manifest)
    return manifest, summary
