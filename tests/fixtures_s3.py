"""Storage fixtures: moto's S3 server over real HTTP on 127.0.0.1, fresh buckets, local stores.

``moto_server`` (session) yields the endpoint URL; ``s3_settings`` the Settings that reach it;
``s3_store`` a store on a fresh bucket; ``local_store`` one in tmp_path; ``any_store`` runs a test
once on each.
"""
from __future__ import annotations

import logging
import uuid
from typing import Iterator

import pytest

from infra.settings import Settings
from infra.storage import Store, open_store

__all__ = ["any_store", "local_store", "moto_server", "s3_settings", "s3_store", "make_s3_bucket"]

MOTO_ACCESS_KEY = "testing"
MOTO_SECRET_KEY = "testing"
MOTO_REGION = "us-east-1"


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto S3 server on a free loopback port for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_settings(moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings that reach the moto server with explicit (fake) credentials."""
    return Settings(
        store=str(tmp_path_factory.mktemp("unused-local-store")),
        s3_endpoint=moto_server,
        s3_region=MOTO_REGION,
        aws_access_key_id=MOTO_ACCESS_KEY,
        aws_secret_access_key=MOTO_SECRET_KEY,
    )


def make_s3_bucket(settings: Settings) -> str:
    """Create a bucket with a unique name on the settings' endpoint; return its name."""
    import boto3

    bucket = f"fm-test-{uuid.uuid4().hex[:16]}"
    client = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        region_name=settings.s3_region,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=settings.aws_secret_access_key,
    )
    client.create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def s3_store(s3_settings: Settings) -> Store:
    """A store at ``s3://<fresh bucket>/fleet`` on the moto server."""
    bucket = make_s3_bucket(s3_settings)
    return open_store(f"s3://{bucket}/fleet", s3_settings)


@pytest.fixture
def local_store(tmp_path) -> Store:
    """A store in a fresh local directory."""
    return open_store(str(tmp_path / "store"), Settings())


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest) -> Store:
    """The test runs once on a local store and once on an S3 (moto) store."""
    return request.getfixturevalue(f"{request.param}_store")
