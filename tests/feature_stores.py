"""A local store holding a planted fleet's features (the Ray GW tests' input)."""
from __future__ import annotations

from infra.storage import open_store
from workers.extract import FeatureRef, features_table


def store_with(fleet, root):
    """A local store at `root` holding the fleet's features, and their references by scorer id."""
    store = open_store(str(root))
    refs = {}
    for scorer_id, x in fleet.features.items():
        key = f"features/{scorer_id}.parquet"
        store.write_table(key, features_table([f"r{n}" for n in range(len(x))], x, {}))
        refs[scorer_id] = FeatureRef(scorer_id, key, x.shape[0], x.shape[1], "ckpt", "data", "config")
    return store, refs
