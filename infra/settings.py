"""Runtime settings: where artifacts live, how to reach S3 and Ray.

Every field can come from a ``FLEETMERGE_*`` environment variable; the S3 fields fall back to the
standard AWS variables so that an existing AWS / MinIO set-up works unchanged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

DEFAULT_STORE = ".fleetmerge"

# field -> environment variables to try, first match wins.
_ENV_SOURCES: dict[str, tuple[str, ...]] = {
    "store": ("FLEETMERGE_STORE",),
    "s3_endpoint": ("FLEETMERGE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    "s3_region": ("FLEETMERGE_S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"),
    "aws_access_key_id": ("FLEETMERGE_AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
    "aws_secret_access_key": ("FLEETMERGE_AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
    "aws_session_token": ("FLEETMERGE_AWS_SESSION_TOKEN", "AWS_SESSION_TOKEN"),
    "ray_address": ("FLEETMERGE_RAY_ADDRESS",),
}

# Offline, loopback-friendly defaults (docs/architecture.md §5); set only where the user has not chosen.
OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "AWS_EC2_METADATA_DISABLED": "true",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "TRANSFORMERS_VERBOSITY": "error",  # no load reports from every Ray worker
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # OpenMP threads that spin while waiting make torch 3-7x slower on small, busy machines.
    "OMP_WAIT_POLICY": "PASSIVE",
}


@dataclass(frozen=True)
class Settings:
    """Where the store is and how to reach it.

    ``store`` is a local directory, a ``file://`` URI or ``s3://bucket/prefix``. ``s3_endpoint`` is
    the URL of an S3-compatible service (MinIO, moto, Ceph ...) with its scheme; a bare
    ``host:port`` is taken as ``https://host:port``. Unset credentials mean the SDKs' default chain.
    """

    store: str = DEFAULT_STORE
    s3_endpoint: str | None = None
    s3_region: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = field(default=None, repr=False)
    aws_session_token: str | None = field(default=None, repr=False)
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if not self.store:
            raise ValueError("Settings.store must be a non-empty path or URI")
        if self.s3_endpoint is not None:
            object.__setattr__(self, "s3_endpoint", normalise_endpoint(self.s3_endpoint))
        if (self.aws_access_key_id is None) != (self.aws_secret_access_key is None):
            raise ValueError(
                "Settings: aws_access_key_id and aws_secret_access_key must be given together "
                f"(got key id {'set' if self.aws_access_key_id else 'unset'}, "
                f"secret {'set' if self.aws_secret_access_key else 'unset'})"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Settings from ``FLEETMERGE_*`` variables (then the AWS ones), with ``overrides`` on top.

        An override of ``None`` clears a value the environment set.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"Settings.from_env: unknown setting(s) {unknown}; known: {sorted(known)}")
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, variables in _ENV_SOURCES.items():
            for variable in variables:
                value = env.get(variable)
                if value:  # an empty variable counts as unset
                    values[name] = value
                    break
        values.update(overrides)
        return cls(**values)


def normalise_endpoint(endpoint: str) -> str:
    """Endpoint URL with a scheme (pyarrow and boto3 both need one); https when none is given."""
    endpoint = endpoint.strip().rstrip("/")
    if not endpoint:
        raise ValueError("s3_endpoint is empty; leave it unset to use AWS S3")
    if "://" not in endpoint:
        return f"https://{endpoint}"
    scheme = endpoint.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"s3_endpoint {endpoint!r}: scheme must be http or https")
    return endpoint


def offline_env() -> dict[str, str]:
    """Set the offline / loopback defaults in ``os.environ`` unless already set; return them as applied."""
    return {key: os.environ.setdefault(key, value) for key, value in OFFLINE_ENV.items()}
