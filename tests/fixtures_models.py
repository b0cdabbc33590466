"""Tiny random BERT fixtures and a tiny fleet built from them (fast, no downloads)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny random BERT checkpoint directory (hidden 32, 3 layers) with a character-level tokenizer."""
    from workers.tiny import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("tiny-base"), seed=0)


@pytest.fixture(scope="session")
def tiny_district(tmp_path_factory):
    """A small synthetic district: 5 items (4 multi-class, 1 multi-label), 60 responses each."""
    from workers.demo_data import write_demo_district

    return write_demo_district(tmp_path_factory.mktemp("district"), n_per_topic=(3, 2), n_responses=60, seed=1)


@pytest.fixture(scope="session")
def tiny_fleet_dir(tmp_path_factory, tiny_base, tiny_district):
    """A built tiny fleet in a local store (session-scoped: built once, copy it before changing it)."""
    import pyarrow.parquet as pq

    from infra.storage import open_store
    from workers.fleet_build import build_fleet, load_items
    from workers.tiny import tiny_finetune_config

    out = tmp_path_factory.mktemp("tiny-fleet")
    responses, items = tiny_district
    build_fleet(pq.read_table(responses), load_items(items), tiny_base, open_store(str(out)), fleet_name="tiny",
                config=tiny_finetune_config(), device="cpu",
                progress=False, log=lambda _: None)
    return out


@pytest.fixture
def fleet(tmp_path, tiny_fleet_dir):
    """A private copy of the tiny fleet that a test may break (modules with their own `fleet` override it)."""
    import shutil

    root = tmp_path / "fleet"
    shutil.copytree(tiny_fleet_dir, root)
    return root
