"""The operator as the chart installs it: ``helm install`` (RBAC, Secret, settings) into a namespace,
then ``python -m commoncanvas_operator`` run here as the chart's ServiceAccount.

The chart's own Deployment is installed with ``replicas: 0``; the process runs on this machine with
the same settings file and that ServiceAccount's token, so it has exactly the chart's permissions.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.harness import REPO_ROOT, LocalCluster
from tests.cluster.minio import MinioServer
from tests.cluster.processes import free_port

CHART = REPO_ROOT / "charts" / "commoncanvas"
SETTINGS_ENV = "COMMONCANVAS_OPERATOR_SETTINGS"


class OperatorProcess:
    """One operator replica; ``standalone`` off means kopf peering (one active among replicas)."""

    def __init__(
        self, namespace: str, env: Mapping[str, str], log: Path, standalone: bool = True, peering: str = ""
    ) -> None:
        self.namespace, self.env, self.log = namespace, dict(env), log
        self.standalone, self.peering = standalone, peering
        self.process: subprocess.Popen[bytes] | None = None
        self.liveness = free_port()
        # Each replica serves /metrics on its own port (they share this host).
        settings = json.loads(Path(self.env[SETTINGS_ENV]).read_text())
        self.metrics_port = settings["operatorMetricsPort"] = free_port()
        own_settings = log.with_suffix(".settings.json")
        own_settings.write_text(json.dumps(settings))
        self.env[SETTINGS_ENV] = str(own_settings)

    def start(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "commoncanvas_operator",
            f"--namespace={self.namespace}",
            f"--liveness=http://127.0.0.1:{self.liveness}/healthz",
        ]
        argv.append("--standalone" if self.standalone else f"--peering={self.peering}")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def log_tail(self, characters: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-characters:] if self.log.exists() else ""


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def helm(cluster: LocalCluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(cluster.bin_dir / "helm"), f"--kubeconfig={cluster.kubeconfig}", *args],
        check=check,
        capture_output=True,
        text=True,
    )


@contextlib.contextmanager
def installed_operator(
    cluster: LocalCluster,
    namespace: str,
    minio: MinioServer,
    work_dir: Path,
    values: Mapping[str, Any] | None = None,
) -> Iterator[dict[str, str]]:
    """The chart installed in ``namespace`` (operator Deployment scaled to 0), watching only it; yields
    the environment an operator process needs (its ServiceAccount kubeconfig and settings file)."""
    store = minio.env()
    defaults: dict[str, Any] = {
        "operator": {"replicas": 0, "watchNamespace": namespace, "reconcileSeconds": 1},
        "workers": {"backoffLimitPerIndex": 0},
        "objectStore": {
            "endpoint": store["S3_ENDPOINT_URL"],
            "accessKeyId": store["AWS_ACCESS_KEY_ID"],
            "secretAccessKey": store["AWS_SECRET_ACCESS_KEY"],
        },
    }
    values_file = work_dir / "values.yaml"
    values_file.write_text(yaml.safe_dump(_deep_merge(defaults, values or {})))
    release = f"cc-{namespace}"
    installed = helm(
        cluster,
        "install",
        release,
        str(CHART),
        f"--namespace={namespace}",
        f"--values={values_file}",
        "--wait",
        "--timeout=60s",
        check=False,
    )
    if installed.returncode:
        raise RuntimeError(f"helm install failed:\n{installed.stderr}")
    config_map = cluster.api.get(f"/api/v1/namespaces/{namespace}/configmaps/{release}-operator")
    settings_file = work_dir / "settings.json"
    settings_file.write_text(config_map["data"]["settings.json"])
    env = {
        **os.environ,
        **store,
        "KUBECONFIG": str(cluster.service_account_kubeconfig(namespace, f"{release}-operator")),
        SETTINGS_ENV: str(settings_file),
    }
    try:
        yield env
    finally:
        helm(cluster, "uninstall", release, f"--namespace={namespace}", check=False)
