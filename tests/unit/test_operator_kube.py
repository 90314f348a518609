"""The operator's API client: its configuration from kopf's login, and how it names failures."""

from __future__ import annotations

import asyncio
import base64
import socket
import stat
import time
from pathlib import Path

import kopf
import pytest
from prometheus_client import REGISTRY

from commoncanvas_operator.kube import Kube, KubeError, configuration, resource_of


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_the_configuration_carries_kopfs_server_ca_client_certificate_and_token() -> None:
    info = kopf.ConnectionInfo(
        server="https://10.0.0.1:6443/",
        ca_data=b64("CA PEM"),
        certificate_data=b64("CERT PEM"),
        private_key_data=b64("KEY PEM"),
        token="t0ken",
    )
    config = configuration(info)
    assert config.host == "https://10.0.0.1:6443"
    assert config.verify_ssl and config.ca_cert_data == "CA PEM"
    assert Path(config.cert_file).read_text() == "CERT PEM"
    assert stat.S_IMODE(Path(config.key_file).stat().st_mode) == 0o600
    assert config.get_api_key_with_prefix("BearerToken", alias="authorization") == "Bearer t0ken"
    # Nothing the server may have seen is sent again by urllib3: the handlers decide on retries.
    assert config.retries.read == 0 and config.retries.status == 0


@pytest.mark.parametrize(
    ("status", "transient"),
    [(0, True), (409, True), (429, True), (500, True), (503, True), (400, False), (403, False), (422, False)],
)
def test_only_no_answer_conflicts_throttling_and_server_failures_are_transient(
    status: int, transient: bool
) -> None:
    assert KubeError(status, "PATCH", "/x", "").transient is transient


def test_the_resource_a_path_names_labels_its_request_count() -> None:
    assert resource_of("/apis/batch/v1/namespaces/ns/jobs/a-plan") == "jobs"
    assert resource_of("/api/v1/namespaces/ns/pods") == "pods"
    assert resource_of("/apis/commoncanvas.dev/v1alpha1/namespaces/ns/scrapejobs/x") == "scrapejobs"
    assert resource_of("/version") == "other"


def job_gets() -> float:
    sample = REGISTRY.get_sample_value(
        "commoncanvas_operator_api_requests_total", {"verb": "GET", "resource": "jobs"}
    )
    return sample or 0.0


def test_a_server_that_does_not_answer_is_a_transient_error_within_the_timeout() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed again below: nothing listens there
    client = Kube(kopf.ConnectionInfo(server=f"http://127.0.0.1:{port}", token="t"))
    before = job_gets()
    started = time.monotonic()

    async def get() -> None:
        try:
            await client.get("/apis/batch/v1/namespaces/ns/jobs/j")
        finally:
            await client.close()

    with pytest.raises(KubeError) as raised:
        asyncio.run(get())
    assert raised.value.status == 0 and raised.value.transient
    assert time.monotonic() - started < 10
    assert job_gets() == before + 1, "counted once (no re-login: the failure was not a 401)"
