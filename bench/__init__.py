"""The benchmarks, runnable as files (python bench/NAME.py) or as modules (python -m bench.NAME)."""

import sys
from pathlib import Path

# The scripts import their helpers (_util, _trio, ...) as top-level modules, as they do when run as files.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
