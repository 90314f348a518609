"""Fixtures shared by the stage tests: the bundled sample served over real HTTP, MinIO credentials."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from commoncanvas import storage
from commoncanvas.sample import Sample, build_sample
from commoncanvas.sample.server import LocalHTTPServer


@pytest.fixture
def operator(cluster: Any, namespace: str, minio: Any, tmp_path: Path) -> Iterator[Any]:
    """The operator as the chart installs it (its RBAC, ServiceAccount and settings), watching the
    test's namespace, with the harness's CPU pool as the chart's ``cpu`` node pool."""
    from tests.cluster.harness import CPU_POOL
    from tests.cluster.operator import OperatorProcess, installed_operator

    values = {"nodePools": {"cpu": {"nodeSelector": CPU_POOL.node_selector, "tolerations": []}}}
    with installed_operator(cluster, namespace, minio, tmp_path, values) as env:
        running = OperatorProcess(namespace, env, tmp_path / "operator.log")
        running.start()
        try:
            yield running
        finally:
            running.kill()
            print(running.log_tail())


@pytest.fixture
def s3_env(minio: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """This process and its workers reach MinIO; S3 errors surface fast instead of after long retries."""
    env = {**minio.env(), "COMMONCANVAS_S3_MAX_ATTEMPTS": "2", "COMMONCANVAS_S3_CONNECT_TIMEOUT": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    storage.s3_client.cache_clear()
    yield env
    storage.s3_client.cache_clear()


@pytest.fixture
def served_sample(tmp_path: Path) -> Iterator[tuple[Sample, LocalHTTPServer]]:
    www = tmp_path / "sample"
    www.mkdir()
    with LocalHTTPServer(root=www / "www", latency=0.05) as server:
        yield build_sample(www, server.base_url), server


@pytest.fixture(scope="session")
def tiny_blip2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from commoncanvas.models import write_tiny_blip2

    return write_tiny_blip2(tmp_path_factory.mktemp("models") / "blip2")
