"""pytest fixtures for the real-component tests: one control plane and one MinIO per test session.

Registered by ``pytest_plugins = ["tests.cluster.fixtures"]`` in tests/conftest.py. A missing binary
fails the test (it does not skip): the binaries are part of the test setup, built by
``make cluster-tools``.

Fixtures: ``cluster`` (session), ``namespace`` (a fresh one per test), ``minio`` (session),
``bucket`` (a fresh one per test), ``start_prometheus`` (per test).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.harness import LocalCluster
from tests.cluster.minio import MinioServer
from tests.cluster.processes import MissingBinaryError, find_binary
from tests.cluster.prometheus import PrometheusServer

_CLUSTER_KEY = pytest.StashKey[LocalCluster]()


def _require(*names: str) -> None:
    try:
        for name in names:
            find_binary(name)
    except MissingBinaryError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[LocalCluster]:
    """A running control plane (2 CPU, 2 A100 fake nodes, 1 local node); its logs stay in pytest's
    basetemp (``cluster0/logs``) after the run."""
    _require("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok")
    local_cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        local_cluster.start()
    except MissingBinaryError as error:
        pytest.fail(str(error), pytrace=False)
    request.session.stash[_CLUSTER_KEY] = local_cluster
    yield local_cluster
    local_cluster.stop()


@pytest.fixture
def namespace(cluster: LocalCluster) -> Iterator[str]:
    """A fresh namespace per test (its default ServiceAccount ready), deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.create_namespace(name)
    yield name
    cluster.api.delete(f"/api/v1/namespaces/{name}")


@pytest.fixture(scope="session")
def minio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MinioServer]:
    """A MinIO server for the session; tests that stop it must start it again."""
    _require("minio")
    root: Path = tmp_path_factory.mktemp("minio")
    server = MinioServer(root / "data", log_dir=root / "logs")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket(minio: MinioServer) -> str:
    """A new empty bucket on the session's MinIO."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    minio.make_bucket(name)
    return name


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[..., PrometheusServer]]:
    """Start a Prometheus scraping the given ``host:port`` targets every second (stopped after the test)."""
    _require("prometheus")
    servers: list[PrometheusServer] = []

    def start(targets: Sequence[str], **options: Any) -> PrometheusServer:
        server = PrometheusServer(tmp_path / f"prometheus-{len(servers)}", targets, **options)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing test that used the cluster gets its state and component logs in the report."""
    report = yield
    if report.failed and "cluster" in getattr(item, "fixturenames", ()):
        local_cluster = item.session.stash.get(_CLUSTER_KEY, None)
        if local_cluster is not None and local_cluster.processes:
            report.sections.append(("cluster diagnostics", local_cluster.diagnostics()))
    return report
