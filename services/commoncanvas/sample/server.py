"""A small real HTTP server in a background thread: serves the sample (and the benchmark's images,
and the tests' fault routes) on loopback, with optional per-request latency."""

from __future__ import annotations

import asyncio
import base64
import mimetypes
import socket
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalHTTPServer:
    """Serves files under `root` (or an in-memory dict), plus any extra `routes` given as handlers."""

    def __init__(
        self,
        root: Path | None = None,
        files: dict[str, bytes] | None = None,
        routes: dict[str, Handler] | None = None,
        latency: float = 0.0,
        on_request: Callable[[str], None] | None = None,
        port: int | None = None,
        basic_auth: str | None = None,
    ) -> None:
        self.root = root
        self.files = files or {}
        self.routes = routes or {}
        self.latency = latency
        self.on_request = on_request
        self.port = port or free_port()
        # "user:password" every request must carry (a mirror behind basic auth), else 401.
        self.authorization = (
            "Basic " + base64.b64encode(basic_auth.encode()).decode() if basic_auth is not None else None
        )
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.requests: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="local-http")
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        if self.on_request is not None:
            self.on_request(request.path)
        if self.authorization is not None and request.headers.get("Authorization") != self.authorization:
            return web.Response(status=401, text="credentials required")
        if self.latency:
            await asyncio.sleep(self.latency)
        if request.path in self.routes:
            return await self.routes[request.path](request)
        body = self.files.get(request.path)
        if body is None and self.root is not None:
            target = (self.root / request.path.lstrip("/")).resolve()
            if target.is_file() and self.root.resolve() in target.parents:
                body = target.read_bytes()
        if body is None:
            return web.Response(status=404, text="not found")
        content_type = mimetypes.guess_type(request.path)[0] or "application/octet-stream"
        return web.Response(body=body, content_type=content_type)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=1024).start()

    def start(self) -> LocalHTTPServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> LocalHTTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
