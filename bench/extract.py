"""Benchmark: feature extraction (workers.extract) against a plain loop, MiniLM-L6 on the Beetle answers.

Both compute the same thing, the [CLS] vector of hidden_states[-3] of MiniLM-L6 loaded as a 3-label
sequence classifier, with the same batch size:
  naive: batches in data order, every batch padded to 128 tokens, autograd on, all layers run;
  ours:  `extract_features` (length-sorted batches with dynamic padding, inference_mode, layers past
         the one needed skipped, bf16 autocast on CUDA).
Runs alternate back to back (the machine is shared), the best of `--repeats` counts for each. The
last line of stdout is one JSON object: responses, naive_rps, ours_rps, speedup_vs_naive, device, ...

    .venv/bin/python bench/extract.py [--data DIR] [--limit N] [--batch-size 64] [--repeats 2] [--threads T]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers.extract import ExtractConfig, extract_features  # noqa: E402
from workers.models import default_base_dir, quiet_transformers  # noqa: E402
from workers.scorer_io import Scorer  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "semeval2013_beetle"
NAIVE_MAX_LENGTH = 128


def load_texts(data_dir: Path, limit: int) -> list[str]:
    path = data_dir / "train.parquet"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass --data DIR (the SemEval-2013 Beetle directory)")
    texts = [t or "" for t in pq.read_table(path, columns=["text"]).column("text").to_pylist()]
    return texts[:limit] if limit > 0 else texts


def naive_features(model, tokenizer, texts: list[str], batch_size: int, layer: int, device: torch.device) -> np.ndarray:
    """The plain loop: data order, fixed padding to 128, autograd on, full forward with every hidden state."""
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding="max_length", truncation=True,
                          max_length=NAIVE_MAX_LENGTH, return_tensors="pt").to(device)
        hidden = model(**batch, output_hidden_states=True).hidden_states[layer]
        out.append(hidden[:, 0].detach().float().cpu().numpy())
    return np.concatenate(out)


def timed(fn) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    value = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SemEval-2013 Beetle directory")
    parser.add_argument("--limit", type=int, default=1024, help="first N answers (0 = all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layer", type=int, default=-3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    quiet_transformers()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    texts = load_texts(args.data, args.limit)
    base = default_base_dir()
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=3, local_files_only=True,
                                                               use_safetensors=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    scorer = Scorer(model, tokenizer, "multiclass", base)
    config = ExtractConfig(layer=args.layer, batch_size=args.batch_size, max_length=NAIVE_MAX_LENGTH)

    def run_naive() -> np.ndarray:
        return naive_features(model, tokenizer, texts, args.batch_size, args.layer, device)

    def run_ours() -> np.ndarray:
        return extract_features(scorer, texts, config)

    # Warm-up (allocator, kernels, tokenizer caches) outside the timed runs.
    naive_features(model, tokenizer, texts[:args.batch_size], args.batch_size, args.layer, device)
    extract_features(scorer, texts[:args.batch_size], config)
    naive_times, ours_times = [], []
    naive_out = ours_out = None
    for _ in range(max(1, args.repeats)):
        seconds, naive_out = timed(run_naive)
        naive_times.append(seconds)
        seconds, ours_out = timed(run_ours)
        ours_times.append(seconds)
        print(f"naive {naive_times[-1]:.2f} s, ours {ours_times[-1]:.2f} s", file=sys.stderr)

    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=NAIVE_MAX_LENGTH)["input_ids"]]
    naive_s, ours_s = min(naive_times), min(ours_times)
    result = {
        "responses": len(texts),
        "naive_rps": round(len(texts) / naive_s, 1),
        "ours_rps": round(len(texts) / ours_s, 1),
        "speedup_vs_naive": round(naive_s / ours_s, 2),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "batch_size": args.batch_size,
        "layer": args.layer,
        "repeats": max(1, args.repeats),
        "naive_seconds": [round(t, 3) for t in naive_times],
        "ours_seconds": [round(t, 3) for t in ours_times],
        "max_abs_diff": float(np.abs(naive_out - ours_out).max()),
        "mean_tokens": round(float(np.mean(lengths)), 1),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
