"""The operator's Kubernetes client for what kopf does not do for us (server-side apply of children,
reading ConfigMaps, Pods and other custom resources): the official ``kubernetes`` client, logged in with
kopf's own credentials, its blocking calls run on a small thread pool off the event loop."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import kopf
import urllib3
from kubernetes.client import ApiClient, Configuration
from kubernetes.client.exceptions import ApiException

from commoncanvas.specs.common import GROUP, PLURALS, VERSION
from commoncanvas_operator import metrics
from commoncanvas_operator.builders import MANAGER

Obj = dict[str, Any]

_CORE = {"ConfigMap": "configmaps", "Service": "services", "Pod": "pods", "Event": "events"}
# (connect, read) seconds: no request waits unbounded.
REQUEST_TIMEOUT = (10, 30)
# A connection that could not be opened is tried once more; nothing the server may have seen is sent
# again (a PATCH or POST twice), and 429/5xx go back to the handlers, which retry the pass in 5 s.
RETRIES = urllib3.Retry(total=1, connect=1, read=0, status=0, redirect=0, other=0)
# Requests in flight at once (one pooled connection each): a pass sends its requests one by one, so
# this bounds how many passes overlap on the API server, not one pass's speed.
THREADS = 8


class KubeError(Exception):
    """An API server's refusal (``status``: its HTTP code), or 0 where no answer came (a connection
    refused, reset or timed out)."""

    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        self.status = status
        self.body = body
        super().__init__(f"{method} {path}: {status}: {body[:500]}")

    @property
    def transient(self) -> bool:
        """Worth retrying soon: no answer, a conflict, throttling or the server's own failure. Any
        other 4xx is refused again on retry."""
        return self.status in (0, 409, 429) or self.status >= 500

    def immutable_fields(self) -> list[str]:
        """The fields a 422 names as immutable (``spec.template``, ...); none for another error."""
        if self.status != 422:
            return []
        try:
            causes = (json.loads(self.body).get("details") or {}).get("causes") or []
        except ValueError:
            return []
        return sorted({str(c.get("field")) for c in causes if "immutable" in str(c.get("message", ""))})


def collection_path(api_version: str, kind: str, namespace: str) -> str:
    if api_version == "v1":
        return f"/api/v1/namespaces/{namespace}/{_CORE[kind]}"
    if api_version == "batch/v1" and kind == "Job":
        return f"/apis/batch/v1/namespaces/{namespace}/jobs"
    if api_version == f"{GROUP}/{VERSION}":
        return f"/apis/{api_version}/namespaces/{namespace}/{PLURALS[kind]}"
    raise ValueError(f"no path known for {api_version} {kind}")


def resource_of(path: str) -> str:
    """The resource a namespaced path names (``jobs`` in ``/apis/batch/v1/namespaces/x/jobs/y``)."""
    parts = path.split("?", 1)[0].strip("/").split("/")
    at = parts.index("namespaces") if "namespaces" in parts else -1
    return parts[at + 2] if at >= 0 and at + 2 < len(parts) else "other"


def _write_temp(data: str | bytes, directory: Path, name: str) -> str:
    path = directory / name
    path.write_bytes(base64.b64decode(data))
    path.chmod(0o600)
    return str(path)


def configuration(info: kopf.ConnectionInfo) -> Configuration:
    """The client's configuration from kopf's login: server, CA, client certificate, token."""
    config = Configuration(host=info.server.rstrip("/"))
    config.verify_ssl = not info.insecure
    config.ssl_ca_cert = str(info.ca_path) if info.ca_path else None
    config.ca_cert_data = base64.b64decode(info.ca_data).decode() if info.ca_data else None
    directory = Path(tempfile.mkdtemp(prefix="commoncanvas-operator-"))
    config.cert_file = (
        str(info.certificate_path)
        if info.certificate_path
        else (_write_temp(info.certificate_data, directory, "client.crt") if info.certificate_data else None)
    )
    config.key_file = (
        str(info.private_key_path)
        if info.private_key_path
        else (_write_temp(info.private_key_data, directory, "client.key") if info.private_key_data else None)
    )
    config.retries = RETRIES
    config.connection_pool_maxsize = THREADS
    _set_token(config, info)
    return config


def _token(info: kopf.ConnectionInfo) -> tuple[str, str] | None:
    return (info.scheme or "Bearer", info.token) if info.token else None


def _set_token(config: Configuration, info: kopf.ConnectionInfo) -> None:
    token = _token(info)
    config.api_key = {"authorization": token[1]} if token else {}
    config.api_key_prefix = {"authorization": token[0]} if token else {}


class Kube:
    """One ``ApiClient`` against the API server kopf logged in to. On a 401 (a bound token rotated or
    expired) it logs in again through `relogin` (which re-reads the token file or kubeconfig) and
    retries once, so a rotated token is picked up without a restart."""

    def __init__(
        self, info: kopf.ConnectionInfo, relogin: Callable[[], kopf.ConnectionInfo | None] | None = None
    ) -> None:
        self._relogin = relogin
        self._token = _token(info)
        self._config = configuration(info)
        self._api = ApiClient(self._config)
        self._threads = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="commoncanvas-kube")

    async def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._api.close()

    def _call(self, method: str, path: str, body: Obj | None, content_type: str, query: list[Any]) -> Any:
        headers = {"Accept": "application/json", **({"Content-Type": content_type} if body else {})}
        serialized = self._api.param_serialize(
            method, path, query_params=query, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        response = self._api.call_api(*serialized, _request_timeout=REQUEST_TIMEOUT)
        response.read()
        return self._api.response_deserialize(response, {"2XX": "object"}).data

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Obj | None = None,
        content_type: str = "application/json",
        query: list[tuple[str, str]] | None = None,
    ) -> Obj | None:
        call = functools.partial(self._call, method, path, body, content_type, query or [])
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            metrics.API_REQUESTS.labels(method, resource_of(path)).inc()
            try:
                result = await loop.run_in_executor(self._threads, call)
            except ApiException as error:
                status = int(error.status or 0)
                if status == 401 and not attempt and self._refresh():
                    continue
                if status == 404 and method == "GET":
                    return None
                raise KubeError(status, method, path, str(error.body or error.reason or "")) from None
            except urllib3.exceptions.HTTPError as error:  # no answer: refused, reset, timed out
                raise KubeError(0, method, path, f"{type(error).__name__}: {error}") from None
            return result if isinstance(result, dict) else {}
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _refresh(self) -> bool:
        """Log in again; True when that gave other credentials (worth one more try)."""
        info = self._relogin() if self._relogin is not None else None
        if info is None or _token(info) == self._token:
            return False
        self._token = _token(info)
        _set_token(self._config, info)
        return True

    async def get(self, path: str) -> Obj | None:
        return await self._request("GET", path)

    async def list(self, path: str, label_selector: str) -> list[Obj]:
        result = await self._request("GET", path, query=[("labelSelector", label_selector)])
        return list((result or {}).get("items") or [])

    async def create(self, obj: Obj) -> bool:
        """Create `obj` unless it exists (False then): for children someone else owns once created."""
        meta = obj["metadata"]
        try:
            await self._request(
                "POST", collection_path(obj["apiVersion"], obj["kind"], meta["namespace"]), body=obj
            )
        except KubeError as error:
            if error.status == 409:
                return False
            raise
        return True

    async def apply(self, obj: Obj) -> Obj:
        """Server-side apply as the operator's one field manager: creating or re-applying is the same."""
        meta = obj["metadata"]
        path = f"{collection_path(obj['apiVersion'], obj['kind'], meta['namespace'])}/{quote(meta['name'])}"
        result = await self._request(
            "PATCH",
            path,
            body=obj,
            content_type="application/apply-patch+yaml",
            query=[("fieldManager", MANAGER), ("force", "true")],
        )
        return result or {}
