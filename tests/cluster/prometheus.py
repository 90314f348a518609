"""A real Prometheus on loopback that scrapes given targets every second, for metrics tests.

Built without the web UI's embedded assets (no ``builtinassets`` tag): the HTTP API works, the UI
pages do not.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.processes import ManagedProcess, find_binary, free_port, http_ok, wait_until


class PrometheusServer:
    def __init__(
        self,
        directory: Path,
        targets: Sequence[str] = (),
        *,
        job: str = "commoncanvas",
        scrape_interval: str = "1s",
        binary: Path | None = None,
        target_labels: Mapping[str, Mapping[str, str]] | None = None,
        rule_files: Sequence[Path] = (),
    ) -> None:
        """``target_labels``: labels a target's series get (as a PodMonitor adds namespace and pod);
        ``rule_files``: recording and alerting rules evaluated every scrape interval."""
        self.directory = directory
        self.targets = list(targets)
        self.target_labels = {target: dict(labels) for target, labels in (target_labels or {}).items()}
        self.rule_files = [str(path) for path in rule_files]
        self.job = job
        self.scrape_interval = scrape_interval
        self.binary = binary or find_binary("prometheus")
        self.port = free_port()
        self._process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_file(self) -> Path:
        return self.directory / "prometheus.yml"

    def _write_config(self) -> None:
        config = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "rule_files": self.rule_files,
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "static_configs": [
                        {"targets": [target], "labels": self.target_labels.get(target, {})}
                        for target in self.targets
                    ],
                }
            ],
        }
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))

    def start(self, timeout: float = 60.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._process = ManagedProcess(
            name="prometheus",
            argv=[
                str(self.binary),
                f"--config.file={self.config_file}",
                f"--storage.tsdb.path={self.directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
                # Hidden flag (default 5s): how often new targets reach the scrapers. Tests want
                # the first sample within a second or two.
                "--scrape.discovery-reload-interval=500ms",
                "--log.level=warn",
            ],
            log_file=self.directory / "prometheus.log",
        )
        self._process.start()
        wait_until(
            lambda: http_ok(f"{self.url}/-/ready"), timeout, "Prometheus /-/ready", processes=[self._process]
        )

    def set_targets(self, targets: Sequence[str]) -> None:
        """Scrape these ``host:port`` targets from now on (config rewritten, then reloaded).

        New targets reach the scrapers within half a second (``--scrape.discovery-reload-interval``).
        """
        self.targets = list(targets)
        self._write_config()
        request = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def query(self, expression: str) -> list[dict[str, Any]]:
        """An instant query; returns ``data.result`` (a list of {metric, value})."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"query {expression!r} failed: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def query_range(self, expression: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """A range query; returns ``data.result`` (a list of {metric, values})."""
        params = {"query": expression, "start": start, "end": end, "step": step}
        url = f"{self.url}/api/v1/query_range?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=30) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"query {expression!r} failed: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for_value(self, expression: str, timeout: float = 30.0) -> float:
        """Poll until ``expression`` returns a sample; its first value."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expression)
            if result:
                return float(result[0]["value"][1])
            if time.monotonic() > deadline:
                raise TimeoutError(f"no sample for {expression!r} after {timeout:.0f}s")
            time.sleep(0.5)

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
