"""A small async Kubernetes client over aiohttp, for what kopf does not do for us: server-side apply of
children, and reading Jobs, Pods and other custom resources. Credentials come from kopf's own login."""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf

from commoncanvas.specs.common import GROUP, PLURALS, VERSION
from commoncanvas_operator import metrics
from commoncanvas_operator.builders import MANAGER

Obj = dict[str, Any]

_CORE = {"ConfigMap": "configmaps", "Service": "services", "Pod": "pods", "Event": "events"}


class KubeError(Exception):
    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        self.status = status
        self.body = body
        super().__init__(f"{method} {path}: {status}: {body[:500]}")

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


def _write_temp(data: str | bytes, directory: Path, name: str) -> str:
    path = directory / name
    path.write_bytes(base64.b64decode(data))
    path.chmod(0o600)
    return str(path)


def ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    context = ssl.create_default_context(cafile=str(info.ca_path) if info.ca_path else None)
    if info.ca_data:
        context.load_verify_locations(cadata=base64.b64decode(info.ca_data).decode())
    directory = Path(tempfile.mkdtemp(prefix="commoncanvas-operator-"))
    cert = info.certificate_path or (
        _write_temp(info.certificate_data, directory, "client.crt") if info.certificate_data else None
    )
    key = info.private_key_path or (
        _write_temp(info.private_key_data, directory, "client.key") if info.private_key_data else None
    )
    if cert:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30, connect=10)  # no request waits unbounded


def _authorization(info: kopf.ConnectionInfo) -> dict[str, str]:
    return {"Authorization": f"{info.scheme or 'Bearer'} {info.token}"} if info.token else {}


class Kube:
    """One aiohttp session against the API server kopf logged in to. On a 401 (a bound token rotated
    or expired) it logs in again through `relogin` (which re-reads the token file or kubeconfig) and
    retries once, so a rotated token is picked up without a restart."""

    def __init__(
        self, info: kopf.ConnectionInfo, relogin: Callable[[], kopf.ConnectionInfo | None] | None = None
    ) -> None:
        self.server = info.server.rstrip("/")
        self._auth = _authorization(info)
        self._relogin = relogin
        self._session = aiohttp.ClientSession(
            headers={"Accept": "application/json"},
            connector=aiohttp.TCPConnector(ssl=ssl_context(info)),
            timeout=REQUEST_TIMEOUT,
        )

    async def close(self) -> None:
        await self._session.close()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Obj | None = None,
        content_type: str = "application/json",
        params: dict[str, str] | None = None,
    ) -> Obj | None:
        data = json.dumps(body) if body is not None else None
        for attempt in range(2):
            metrics.API_REQUESTS.labels(method).inc()
            headers = {"Content-Type": content_type, **self._auth}
            async with self._session.request(
                method, self.server + path, data=data, params=params, headers=headers
            ) as response:
                text = await response.text()
                status = response.status
            if status != 401 or attempt or not self._refresh():
                break
        if status == 404 and method == "GET":
            return None
        if status >= 400:
            raise KubeError(status, method, path, text)
        result: Obj = json.loads(text) if text else {}
        return result

    def _refresh(self) -> bool:
        """Log in again; True when that gave other credentials (worth one more try)."""
        info = self._relogin() if self._relogin is not None else None
        if info is None or _authorization(info) == self._auth:
            return False
        self._auth = _authorization(info)
        return True

    async def get(self, path: str) -> Obj | None:
        return await self._request("GET", path)

    async def list(self, path: str, label_selector: str) -> list[Obj]:
        result = await self._request("GET", path, params={"labelSelector": label_selector})
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
            params={"fieldManager": MANAGER, "force": "true"},
        )
        return result or {}
