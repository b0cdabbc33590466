"""Test-wide set-up: offline, loopback-only, quiet services; shared fixtures live in fixtures_*.py."""
import os


# Set before anything imports transformers, ray or prefect.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "AWS_EC2_METADATA_DISABLED": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

# Tiny test models run far faster on one thread than on two contended ones.
torch.set_num_threads(1)

from fixtures_s3 import *  # noqa: E402,F401,F403
from fixtures_models import *  # noqa: E402,F401,F403
from fixtures_ray import *  # noqa: E402,F401,F403
from fixtures_prefect import *  # noqa: E402,F401,F403
