"""A small typed Kubernetes REST client over httpx, enough for the test harness and the pod runner.

It reads a kubeconfig (client certificate or bearer token) and speaks JSON to the API server.
It is not a general client: paths are written out by the caller (``/api/v1/namespaces/x/pods``).
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

Obj = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


class ApiError(Exception):
    """A non-2xx answer from the API server, with its Status reason and message."""

    def __init__(self, status_code: int, body: Obj | str, method: str, path: str) -> None:
        self.status_code = status_code
        self.body = body
        self.reason = body.get("reason", "") if isinstance(body, dict) else ""
        self.message = body.get("message", "") if isinstance(body, dict) else str(body)
        super().__init__(f"{method} {path}: {status_code} {self.reason}: {self.message}")


@dataclass(frozen=True)
class Credentials:
    server: str
    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    token: str | None = None


def _materialise(data_b64: str | None, path: str | None, directory: Path, name: str) -> str | None:
    """ssl wants files: kubeconfig *-data fields are written out once next to each other."""
    if path:
        return path
    if data_b64 is None:
        return None
    target = directory / name
    target.write_bytes(base64.b64decode(data_b64))
    target.chmod(0o600)
    return str(target)


def load_kubeconfig(path: Path) -> Credentials:
    """Credentials of the current context (client certificate or token; no exec plugins)."""
    config = yaml.safe_load(path.read_text())
    context_name = config["current-context"]
    context = next(c["context"] for c in config["contexts"] if c["name"] == context_name)
    cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
    user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
    directory = Path(tempfile.mkdtemp(prefix="kubeapi-"))
    ca_file = _materialise(
        cluster.get("certificate-authority-data"), cluster.get("certificate-authority"), directory, "ca.crt"
    )
    if ca_file is None:
        raise ValueError(f"{path}: the harness only talks TLS with a known CA")
    return Credentials(
        server=cluster["server"],
        ca_file=ca_file,
        cert_file=_materialise(
            user.get("client-certificate-data"), user.get("client-certificate"), directory, "client.crt"
        ),
        key_file=_materialise(user.get("client-key-data"), user.get("client-key"), directory, "client.key"),
        token=user.get("token"),
    )


class KubeApi:
    """JSON over HTTPS to one API server. Thread-safe for plain requests (httpx pools connections)."""

    def __init__(self, credentials: Credentials, timeout: float = 30.0) -> None:
        self.credentials = credentials
        headers = {"Accept": "application/json"}
        if credentials.token:
            headers["Authorization"] = f"Bearer {credentials.token}"
        tls = ssl.create_default_context(cafile=credentials.ca_file)
        if credentials.cert_file:
            tls.load_cert_chain(credentials.cert_file, credentials.key_file)
        self._client = httpx.Client(
            base_url=credentials.server,
            verify=tls,
            headers=headers,
            timeout=timeout,
        )

    @classmethod
    def from_kubeconfig(cls, path: Path, timeout: float = 30.0) -> KubeApi:
        return cls(load_kubeconfig(path), timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> KubeApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Obj | list[Any] | None = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        content = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": content_type} if content is not None else {}
        response = self._client.request(method, path, content=content, params=params, headers=headers)
        if response.status_code >= 300:
            try:
                error_body: Obj | str = response.json()
            except ValueError:
                error_body = response.text
            raise ApiError(response.status_code, error_body, method, path)
        if not response.content:
            return {}
        result: Obj = response.json()
        return result

    def get(self, path: str, params: dict[str, str] | None = None) -> Obj:
        return self.request("GET", path, params=params)

    def get_or_none(self, path: str) -> Obj | None:
        try:
            return self.get(path)
        except ApiError as error:
            if error.status_code == 404:
                return None
            raise

    def create(self, path: str, body: Obj) -> Obj:
        return self.request("POST", path, body=body)

    def replace(self, path: str, body: Obj) -> Obj:
        return self.request("PUT", path, body=body)

    def patch(self, path: str, body: Obj, content_type: str = MERGE_PATCH) -> Obj:
        return self.request("PATCH", path, body=body, content_type=content_type)

    def delete(self, path: str, body: Obj | None = None, missing_ok: bool = True) -> Obj:
        try:
            return self.request("DELETE", path, body=body)
        except ApiError as error:
            if missing_ok and error.status_code == 404:
                return {}
            raise

    def update_with_retry(
        self, path: str, mutate: Callable[[Obj], bool], subresource: str = "", attempts: int = 10
    ) -> Obj | None:
        """GET, mutate in place, PUT (to ``path/subresource``); retried on conflicts.

        ``mutate`` returns False to skip the write. Used for status lists (conditions,
        containerStatuses) that a merge patch would replace whole. Returns None when the object is gone.
        The object is read from ``path`` itself: a node may GET its pods but not their status.
        """
        write_path = f"{path}/{subresource}" if subresource else path
        for _ in range(attempts):
            current = self.get_or_none(path)
            if current is None:
                return None
            if not mutate(current):
                return current
            try:
                return self.replace(write_path, current)
            except ApiError as error:
                if error.status_code == 409:
                    continue
                if error.status_code == 404:
                    return None
                raise
        raise RuntimeError(f"{path}: still conflicting after {attempts} attempts")

    def watch(
        self,
        path: str,
        params: dict[str, str] | None = None,
        timeout_seconds: int = 60,
    ) -> Iterator[Obj]:
        """Yield watch events ({"type": ..., "object": ...}) until the server closes the stream."""
        query = dict(params or {})
        query.update({"watch": "true", "timeoutSeconds": str(timeout_seconds), "allowWatchBookmarks": "true"})
        with self._client.stream(
            "GET", path, params=query, timeout=httpx.Timeout(timeout_seconds + 15.0, connect=10.0)
        ) as response:
            if response.status_code >= 300:
                response.read()
                raise ApiError(response.status_code, response.text, "WATCH", path)
            for line in response.iter_lines():
                if line:
                    yield json.loads(line)

    def wait_for(
        self,
        path: str,
        predicate: Callable[[Obj], bool],
        timeout: float,
        description: str,
        interval: float = 0.25,
    ) -> Obj:
        """Poll ``path`` until ``predicate`` holds; the error names what was awaited and the last state."""
        deadline = time.monotonic() + timeout
        last: Obj | None = None
        while True:
            last = self.get_or_none(path)
            if last is not None and predicate(last):
                return last
            if time.monotonic() > deadline:
                state = json.dumps(last.get("status") if last else None, indent=1)[:3000]
                raise TimeoutError(
                    f"timed out after {timeout:.0f}s waiting for {description}; status: {state}"
                )
            time.sleep(interval)


def condition(obj: Obj, condition_type: str) -> Obj | None:
    """The status condition of that type, if present."""
    for item in obj.get("status", {}).get("conditions") or []:
        if item.get("type") == condition_type:
            found: Obj = item
            return found
    return None


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def now_micro() -> str:
    """MicroTime as the API server wants it for Lease.spec.renewTime."""
    seconds = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1e6):06d}Z"
