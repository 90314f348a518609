"""A real Kubernetes control plane on loopback for tests: etcd, kube-apiserver (TLS, RBAC, Node
authorizer), kube-controller-manager, kube-scheduler, kwok for fake nodes, and a pod runner for a
"local" node whose pods run as real processes.

Nothing here needs root, containers or the network: the binaries come from ``make cluster-tools``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.cluster import kwok_stages
from tests.cluster.kubeapi import KubeApi, Obj, condition, now_rfc3339
from tests.cluster.pki import CertificateAuthority, KeyPair, write_signing_key
from tests.cluster.processes import (
    REPO_ROOT,
    ManagedProcess,
    bin_dir,
    find_binary,
    free_port,
    http_ok,
    pid_alive,
    stop_process_group,
    tail,
    wait_until,
)

POOL_LABEL = "commoncanvas.dev/pool"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"
A100_PRODUCT = "NVIDIA-A100-SXM4-80GB"
SERVICE_CIDR = "10.96.0.0/16"
STATE_FILE = "cluster.json"

BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok")
KUEUE_PORTS = ("kueue-health", "kueue-metrics", "kueue-webhook")
KUEUE_NAMESPACE = "kueue-system"
# Kueue manages Jobs only in namespaces carrying this label (the Kueue tests set it on theirs), so the
# other tests' queue-labelled Jobs (Kueue's part played by hand) are left alone.
KUEUE_MANAGED_LABEL = "commoncanvas.dev/kueue-managed"


@dataclass(frozen=True)
class NodePool:
    """Nodes of one kind: their pool label value, labels, taints and allocatable resources."""

    name: str
    allocatable: Mapping[str, str]
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: Sequence[Mapping[str, str]] = ()

    def node_labels(self, node_name: str) -> dict[str, str]:
        return {
            POOL_LABEL: self.name,
            "kubernetes.io/hostname": node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **self.labels,
        }

    @property
    def node_selector(self) -> dict[str, str]:
        return {POOL_LABEL: self.name}

    @property
    def tolerations(self) -> list[dict[str, str]]:
        return [{"key": t["key"], "operator": "Exists", "effect": t["effect"]} for t in self.taints]


CPU_POOL = NodePool(name="cpu", allocatable={"cpu": "16", "memory": "64Gi", "pods": "110"})
A100_POOL = NodePool(
    name="a100",
    allocatable={"cpu": "96", "memory": "1152Gi", "pods": "110", GPU_RESOURCE: "8"},
    labels={
        "nvidia.com/gpu.product": A100_PRODUCT,
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.count": "8",
        "nvidia.com/gpu.memory": "81920",
    },
    taints=({"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"},),
)
# Pods land on the local pool only when they ask (selector + toleration): an unrelated pod there
# would be run as a process on this machine.
LOCAL_POOL = NodePool(
    name="local",
    allocatable={},
    taints=({"key": POOL_LABEL, "value": "local", "effect": "NoSchedule"},),
)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(
    path: Path,
    server: str,
    ca_file: Path,
    user: str,
    *,
    client: KeyPair | None = None,
    token: str | None = None,
    namespace: str | None = None,
) -> Path:
    """A kubeconfig with the CA and credentials embedded, so it can be copied anywhere."""
    credentials: dict[str, str] = {}
    if client is not None:
        credentials["client-certificate-data"] = _b64(client.cert_file)
        credentials["client-key-data"] = _b64(client.key_file)
    if token is not None:
        credentials["token"] = token
    context: dict[str, str] = {"cluster": "commoncanvas-test", "user": user}
    if namespace:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "commoncanvas-test",
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_file)},
            }
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": user, "context": context}],
        "current-context": user,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


class LocalCluster:
    """One control plane under ``state_dir`` (pki/, kubeconfigs/, logs/, etcd/, pods/).

    ``detached=True`` lets the processes outlive this Python process (for ``cluster up``);
    otherwise they die with it even if ``stop()`` is never reached.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        cpu_nodes: int = 2,
        a100_nodes: int = 2,
        local_nodes: int = 1,
        pod_run_seconds: float = 1.0,
        local_pod_env: Mapping[str, str] | None = None,
        binaries: Path | None = None,
        detached: bool = False,
        extra_args: Mapping[str, Sequence[str]] | None = None,
        kueue: bool = True,
    ) -> None:
        self.state_dir = state_dir.resolve()
        self.kueue = kueue
        self.cpu_nodes = cpu_nodes
        self.a100_nodes = a100_nodes
        self.local_nodes = local_nodes
        self.pod_run_seconds = pod_run_seconds
        self.local_pod_env = dict(local_pod_env or {})
        self.bin_dir = binaries or bin_dir()
        self.detached = detached
        # More flags for a component by process name, e.g. {"kube-scheduler": ["--kube-api-qps=500"]}.
        self.extra_args = {name: list(args) for name, args in (extra_args or {}).items()}
        self.pki_dir = self.state_dir / "pki"
        self.logs_dir = self.state_dir / "logs"
        self.kubeconfig_dir = self.state_dir / "kubeconfigs"
        self.pods_dir = self.state_dir / "pods"
        self.kubeconfig = self.kubeconfig_dir / "admin.kubeconfig"
        self.processes: list[ManagedProcess] = []
        self.ports: dict[str, int] = {}
        self._api: KubeApi | None = None
        self._admin: KeyPair | None = None
        self._ca: CertificateAuthority | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def check_binaries(self) -> None:
        for name in (*BINARIES, *(("kueue",) if self.kueue else ())):
            find_binary(name, self.bin_dir)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def api(self) -> KubeApi:
        if self._api is None:
            self._api = KubeApi.from_kubeconfig(self.kubeconfig)
        return self._api

    def start(self, timeout: float = 120.0) -> None:
        self.check_binaries()
        started = time.monotonic()
        for directory in ("etcd", "pods", "kubeconfigs", "pki", "kwok"):
            shutil.rmtree(self.state_dir / directory, ignore_errors=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        for name in (
            "etcd",
            "etcd-peer",
            "apiserver",
            "controller-manager",
            "scheduler",
            "kwok",
            *KUEUE_PORTS,
        ):
            self.ports[name] = free_port()
        phases: list[str] = []
        try:
            for phase, step in (
                ("credentials", self._write_credentials),
                ("etcd", lambda: self._start_etcd(timeout)),
                ("kube-apiserver", self._start_apiserver),
                # Not earlier: the controller manager and scheduler exit when they cannot read
                # their authentication config from the API server at start.
                ("kube-apiserver ready", lambda: self._wait_apiserver(timeout)),
                ("controllers", self._start_controllers),
                *((("kueue", self._start_kueue),) if self.kueue else ()),
                ("fake nodes", self._create_fake_nodes),
                ("pod runners", self._start_pod_runners),
                ("ready", lambda: self._wait_ready(timeout)),
            ):
                begun = time.monotonic()
                step()
                phases.append(f"{phase} {time.monotonic() - begun:.1f}s")
        except BaseException:
            self.stop()
            raise
        self._write_state()
        with (self.logs_dir / "harness.log").open("a") as log:
            log.write(
                f"cluster ready in {time.monotonic() - started:.1f}s at {self.server} ({', '.join(phases)})\n"
            )

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
        if self._api is not None:
            self._api.close()
            self._api = None
        state = self.state_dir / STATE_FILE
        state.unlink(missing_ok=True)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- credentials -----------------------------------------------------------------------

    def _write_credentials(self) -> None:
        ca = self._ca = CertificateAuthority(self.pki_dir)
        serving_names = (
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        )
        self.apiserver_cert = ca.issue(
            "apiserver", "kube-apiserver", server_names=serving_names, server_ips=("127.0.0.1", "10.96.0.1")
        )
        self.controller_manager_serving = ca.issue(
            "controller-manager-serving", "kube-controller-manager", server_ips=("127.0.0.1",), client=False
        )
        self.scheduler_serving = ca.issue(
            "scheduler-serving", "kube-scheduler", server_ips=("127.0.0.1",), client=False
        )
        self.service_account_key = self.pki_dir / "service-account.key"
        self.service_account_public_key = self.pki_dir / "service-account.pub"
        write_signing_key(self.service_account_key, self.service_account_public_key)
        self._admin = ca.issue("admin", "commoncanvas-admin", organizations=("system:masters",))
        write_kubeconfig(self.kubeconfig, self.server, ca.cert_file, "admin", client=self._admin)
        for user, common_name, organizations in (
            ("controller-manager", "system:kube-controller-manager", ()),
            ("scheduler", "system:kube-scheduler", ()),
            # kwok patches any pod and node it manages, as a kubelet fleet would: give it admin.
            ("kwok", "kwok-controller", ("system:masters",)),
        ):
            pair = ca.issue(user, common_name, organizations=organizations)
            write_kubeconfig(
                self.kubeconfig_dir / f"{user}.kubeconfig", self.server, ca.cert_file, user, client=pair
            )

    def _start_kueue(self) -> None:
        """Kueue's controller manager with its CRDs (from the same build, cluster-tools), managing the
        batch/v1 Jobs that carry a ``kueue.x-k8s.io/queue-name`` label in namespaces labelled
        ``KUEUE_MANAGED_LABEL``; nothing else is touched. Its
        webhooks are served but not registered (no Service to reach them): the operator creates queued
        Jobs suspended itself, as Kueue's Job webhook would make them."""
        assert self._ca is not None
        crds = self.bin_dir.parent / "share" / "kueue" / "crds"
        self.kubectl("apply", "--server-side", f"--filename={crds}", timeout=120)
        self.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", "--filename", str(crds), timeout=90
        )
        self.kubectl("create", "namespace", KUEUE_NAMESPACE)
        certs = self.state_dir / "kueue" / "certs"
        certs.mkdir(parents=True, exist_ok=True)
        serving = self._ca.issue("kueue-serving", "kueue", server_ips=("127.0.0.1",), client=False)
        shutil.copyfile(serving.cert_file, certs / "tls.crt")
        shutil.copyfile(serving.key_file, certs / "tls.key")
        # A controller with wide RBAC in a real cluster; admin here, as kwok is.
        pair = self._ca.issue("kueue", "kueue-controller-manager", organizations=("system:masters",))
        kubeconfig = write_kubeconfig(
            self.kubeconfig_dir / "kueue.kubeconfig", self.server, self._ca.cert_file, "kueue", client=pair
        )
        config = self.state_dir / "kueue" / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "config.kueue.x-k8s.io/v1beta2",
                    "kind": "Configuration",
                    "namespace": KUEUE_NAMESPACE,
                    "health": {"healthProbeBindAddress": f"127.0.0.1:{self.ports['kueue-health']}"},
                    "metrics": {"bindAddress": f"127.0.0.1:{self.ports['kueue-metrics']}"},
                    "webhook": {
                        "host": "127.0.0.1",
                        "port": self.ports["kueue-webhook"],
                        "certDir": str(certs),
                    },
                    "leaderElection": {"leaderElect": False},
                    "internalCertManagement": {"enable": False},
                    "integrations": {"frameworks": ["batch/job"]},
                    "managedJobsNamespaceSelector": {"matchLabels": {KUEUE_MANAGED_LABEL: "true"}},
                }
            )
        )
        self._spawn(
            "kueue",
            [
                self._binary("kueue"),
                f"--config={config}",
                f"--kubeconfig={kubeconfig}",
                # The on-demand visibility API needs an APIService registration; not used here.
                "--feature-gates=VisibilityOnDemand=false,ManagedJobsNamespaceSelectorAlwaysRespected=true",
            ],
            env={**os.environ, "KUEUE_METRICS_CERT_DIR": str(certs)},
        )

    def _node_kubeconfig(self, node_name: str) -> Path:
        """Node identity (system:node:NAME in system:nodes), authorised by the Node authorizer."""
        assert self._ca is not None
        pair = self._ca.issue(
            f"node-{node_name}", f"system:node:{node_name}", organizations=("system:nodes",)
        )
        return write_kubeconfig(
            self.kubeconfig_dir / f"node-{node_name}.kubeconfig",
            self.server,
            self._ca.cert_file,
            f"system:node:{node_name}",
            client=pair,
        )

    def _tls_context(self) -> ssl.SSLContext:
        assert self._ca is not None and self._admin is not None
        context = ssl.create_default_context(cafile=str(self._ca.cert_file))
        context.load_cert_chain(str(self._admin.cert_file), str(self._admin.key_file))
        return context

    # ---- processes -------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> ManagedProcess:
        process = ManagedProcess(
            name=name,
            argv=[*argv, *self.extra_args.get(name, ())],
            log_file=self.logs_dir / f"{name}.log",
            env=env,
            cwd=self.state_dir,
            die_with_parent=not self.detached,
        )
        process.start()
        self.processes.append(process)
        return process

    def _binary(self, name: str) -> str:
        return str(self.bin_dir / name)

    def _start_etcd(self, timeout: float) -> None:
        client_url = f"http://127.0.0.1:{self.ports['etcd']}"
        peer_url = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        etcd = self._spawn(
            "etcd",
            [
                self._binary("etcd"),
                "--name=test",
                f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=test={peer_url}",
                # Throwaway data: skipping fsync makes the API server several times faster here.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        wait_until(lambda: http_ok(f"{client_url}/health"), timeout, "etcd /health", processes=[etcd])

    def _start_apiserver(self) -> None:
        assert self._ca is not None
        self._spawn(
            "kube-apiserver",
            [
                self._binary("kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.ports['apiserver']}",
                f"--tls-cert-file={self.apiserver_cert.cert_file}",
                f"--tls-private-key-file={self.apiserver_cert.key_file}",
                f"--client-ca-file={self._ca.cert_file}",
                # Published for the controller manager's and scheduler's delegated authentication;
                # no front proxy exists, and no cert is ever issued to the allowed name.
                f"--requestheader-client-ca-file={self._ca.cert_file}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--cert-dir={self.pki_dir / 'apiserver-generated'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={self.service_account_public_key}",
                f"--service-account-signing-key-file={self.service_account_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                # Endpoints may not point at loopback, so the `kubernetes` Service gets none.
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--profiling=false",
            ],
        )

    def _wait_apiserver(self, timeout: float) -> None:
        context = self._tls_context()
        wait_until(
            lambda: http_ok(f"{self.server}/readyz", context=context),
            timeout,
            "kube-apiserver /readyz",
            processes=self.processes,
            interval=0.2,
        )

    def _start_controllers(self) -> None:
        assert self._ca is not None
        kubeconfigs = self.kubeconfig_dir
        controller_manager_kubeconfig = kubeconfigs / "controller-manager.kubeconfig"
        self._spawn(
            "kube-controller-manager",
            [
                self._binary("kube-controller-manager"),
                f"--kubeconfig={controller_manager_kubeconfig}",
                f"--authentication-kubeconfig={controller_manager_kubeconfig}",
                f"--authorization-kubeconfig={controller_manager_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['controller-manager']}",
                f"--tls-cert-file={self.controller_manager_serving.cert_file}",
                f"--tls-private-key-file={self.controller_manager_serving.key_file}",
                f"--service-account-private-key-file={self.service_account_key}",
                f"--root-ca-file={self._ca.cert_file}",
                # Each controller acts as its own ServiceAccount with its own RBAC, as in a real
                # cluster; it costs about 4 s of start-up (a token per controller).
                "--use-service-account-credentials=true",
                "--controllers=*",
                "--leader-elect=false",
                "--cluster-name=commoncanvas-test",
            ],
        )
        scheduler_kubeconfig = kubeconfigs / "scheduler.kubeconfig"
        self._spawn(
            "kube-scheduler",
            [
                self._binary("kube-scheduler"),
                f"--kubeconfig={scheduler_kubeconfig}",
                f"--authentication-kubeconfig={scheduler_kubeconfig}",
                f"--authorization-kubeconfig={scheduler_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['scheduler']}",
                f"--tls-cert-file={self.scheduler_serving.cert_file}",
                f"--tls-private-key-file={self.scheduler_serving.key_file}",
                "--leader-elect=false",
            ],
        )
        kwok_dir = self.state_dir / "kwok"
        kwok_dir.mkdir(parents=True, exist_ok=True)
        config = kwok_dir / "kwok.yaml"
        config.write_text(kwok_stages.kwok_config(self.pod_run_seconds))
        self._spawn(
            "kwok",
            [
                self._binary("kwok"),
                f"--kubeconfig={kubeconfigs / 'kwok.kubeconfig'}",
                f"--config={config}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                f"--server-address=127.0.0.1:{self.ports['kwok']}",
                "--node-lease-duration-seconds=40",
            ],
            # kwok reads ~/.kwok/kwok.yaml first when present; keep a person's own setup out of it.
            env={**os.environ, "KWOK_WORKDIR": str(kwok_dir)},
        )

    def _start_pod_runners(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        for index in range(self.local_nodes):
            node_name = f"{LOCAL_POOL.name}-{index}"
            argv = [
                sys.executable,
                "-m",
                "tests.cluster.podrunner",
                f"--kubeconfig={self._node_kubeconfig(node_name)}",
                f"--node={node_name}",
                f"--work-dir={self.pods_dir / node_name}",
            ]
            for key, value in self.local_pod_env.items():
                argv.append(f"--env={key}={value}")
            self._spawn(f"podrunner-{node_name}", argv, env=env)

    # ---- nodes -----------------------------------------------------------------------------

    def _create_fake_nodes(self) -> None:
        for pool, count in ((CPU_POOL, self.cpu_nodes), (A100_POOL, self.a100_nodes)):
            for index in range(count):
                self.create_node(f"{pool.name}-{index}", pool)

    def create_node(self, name: str, pool: NodePool) -> Obj:
        """A kwok-managed fake node of ``pool``; kwok marks it Ready and heartbeats its Lease."""
        node: Obj = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {**pool.node_labels(name), "type": "kwok"},
                "annotations": {KWOK_NODE_ANNOTATION: "fake"},
            },
            "spec": {"taints": [dict(t) for t in pool.taints]},
            "status": {"allocatable": dict(pool.allocatable), "capacity": dict(pool.allocatable)},
        }
        return self.api.create("/api/v1/nodes", node)

    def delete_node(self, name: str, gc_pods_now: bool = False) -> None:
        """Node loss: the Node object goes and its pods are orphaned.

        The controller manager's pod GC fails and deletes them 40-80 s later (DisruptionTarget
        condition, reason DeletionByPodGC). ``gc_pods_now`` does the same to them at once, for
        tests that cannot wait that long.
        """
        pods = self.api.get("/api/v1/pods", params={"fieldSelector": f"spec.nodeName={name}"})["items"]
        self.api.delete(f"/api/v1/nodes/{name}")
        if not gc_pods_now:
            return
        for pod in pods:
            meta = pod["metadata"]
            path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"

            def fail(current: Obj, uid: str = meta["uid"]) -> bool:
                status = current.setdefault("status", {})
                if current["metadata"]["uid"] != uid or status.get("phase") in ("Succeeded", "Failed"):
                    return False
                status["phase"] = "Failed"
                status["conditions"] = [
                    *(c for c in status.get("conditions") or [] if c["type"] != "DisruptionTarget"),
                    {
                        "type": "DisruptionTarget",
                        "status": "True",
                        "reason": "DeletionByPodGC",
                        "message": "PodGC: node no longer exists",
                        "lastTransitionTime": now_rfc3339(),
                    },
                ]
                return True

            self.api.update_with_retry(path, fail, subresource="status")
            self.api.delete(path, body={"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}})

    def node_names(self, pool: NodePool) -> list[str]:
        nodes = self.api.get("/api/v1/nodes", params={"labelSelector": f"{POOL_LABEL}={pool.name}"})
        return sorted(n["metadata"]["name"] for n in nodes["items"])

    # ---- readiness -------------------------------------------------------------------------

    def _wait_ready(self, timeout: float) -> None:
        assert self._ca is not None
        verify = ssl.create_default_context(cafile=str(self._ca.cert_file))
        for name, url in (
            ("kube-controller-manager", f"https://127.0.0.1:{self.ports['controller-manager']}/healthz"),
            ("kube-scheduler", f"https://127.0.0.1:{self.ports['scheduler']}/readyz"),
            ("kwok", f"http://127.0.0.1:{self.ports['kwok']}/healthz"),
            *((("kueue", f"http://127.0.0.1:{self.ports['kueue-health']}/readyz"),) if self.kueue else ()),
        ):
            context = verify if url.startswith("https") else None
            wait_until(
                lambda url=url, context=context: http_ok(url, context=context),  # type: ignore[misc]
                timeout,
                f"{name} health",
                processes=self.processes,
            )
        # The service-account controller making `default` shows the controller manager really works.
        wait_until(
            lambda: self.api.get_or_none("/api/v1/namespaces/default/serviceaccounts/default") is not None,
            timeout,
            "the default ServiceAccount (kube-controller-manager)",
            processes=self.processes,
        )
        expected = self.cpu_nodes + self.a100_nodes + self.local_nodes
        wait_until(
            lambda: self._ready_nodes() >= expected,
            timeout,
            f"{expected} Ready nodes",
            processes=self.processes,
        )

    def _ready_nodes(self) -> int:
        nodes = self.api.get("/api/v1/nodes")["items"]
        return sum(1 for node in nodes if (condition(node, "Ready") or {}).get("status") == "True")

    def _write_state(self) -> None:
        state = {
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "ports": self.ports,
            "processes": [{"name": p.name, "pid": p.pid, "argv0": p.argv[0]} for p in self.processes],
        }
        (self.state_dir / STATE_FILE).write_text(json.dumps(state, indent=2))

    # ---- helpers for tests -----------------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl as cluster admin; on failure the error carries its stderr."""
        result = subprocess.run(
            [self._binary("kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(
                result.returncode, result.args, output=result.stdout, stderr=result.stderr
            )
        return result

    def apply(self, manifests: str | Obj | Iterable[Obj], namespace: str | None = None) -> str:
        """``kubectl apply`` YAML text or objects (server-side validation, real admission)."""
        text = manifests if isinstance(manifests, str) else _to_yaml(manifests)
        args = ["apply", "-f", "-"] + ([f"--namespace={namespace}"] if namespace else [])
        return self.kubectl(*args, input=text).stdout

    def create_namespace(self, name: str, timeout: float = 30.0) -> None:
        """A namespace whose `default` ServiceAccount exists, so pods can be admitted in it."""
        self.api.create(
            "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        )
        self.api.wait_for(
            f"/api/v1/namespaces/{name}/serviceaccounts/default",
            lambda _: True,
            timeout,
            f"{name}/default SA",
        )

    def service_account_kubeconfig(
        self, namespace: str, name: str, duration: str = "2h", bound_secret: str = ""
    ) -> Path:
        """A kubeconfig holding a TokenRequest token for ServiceAccount ``namespace/name`` (written
        over the last one; with ``bound_secret``, a token that deleting that Secret invalidates)."""
        assert self._ca is not None
        bound = ["--bound-object-kind=Secret", f"--bound-object-name={bound_secret}"] if bound_secret else []
        token = self.kubectl(
            "create", "token", name, f"--namespace={namespace}", f"--duration={duration}", *bound
        ).stdout
        return write_kubeconfig(
            self.kubeconfig_dir / f"sa-{namespace}-{name}.kubeconfig",
            self.server,
            self._ca.cert_file,
            f"system:serviceaccount:{namespace}:{name}",
            token=token.strip(),
            namespace=namespace,
        )

    def pod_log(self, namespace: str, name: str) -> str:
        """Output of a pod the pod runner ran (there is no kubelet for `kubectl logs`)."""
        logs = sorted(self.pods_dir.glob(f"*/{namespace}_{name}_*/container.log"))
        return "\n".join(path.read_text(errors="replace") for path in logs)

    def diagnostics(self, log_lines: int = 30) -> str:
        """What a failing test should show: objects, recent events and the tail of every log."""
        sections: list[str] = []
        for args in (
            ("get", "nodes,pods,jobs", "--all-namespaces", "-o", "wide"),
            ("get", "events", "--all-namespaces", "--sort-by=.lastTimestamp"),
        ):
            try:
                result = self.kubectl(*args, check=False, timeout=15)
                output = result.stdout + result.stderr
            except (OSError, subprocess.SubprocessError) as error:
                output = str(error)
            sections.append(f"$ kubectl {' '.join(args)}\n" + "\n".join(output.splitlines()[-60:]))
        for log in sorted(self.logs_dir.glob("*.log")):
            sections.append(f"--- {log}\n{tail(log, log_lines)}")
        return "\n\n".join(sections)


def _to_yaml(objects: Obj | Iterable[Obj]) -> str:
    if isinstance(objects, dict):
        return yaml.safe_dump(objects, sort_keys=False)
    return yaml.safe_dump_all(list(objects), sort_keys=False)


def stop_from_state(state_file: Path) -> list[str]:
    """Stop processes that another process (``cluster up``) recorded in ``state_file``."""
    if not state_file.exists():
        return []
    state: dict[str, Any] = json.loads(state_file.read_text())
    stopped: list[str] = []
    for process in reversed(state["processes"]):
        pid = process["pid"]
        # Only a pid that still runs the binary we started: pids get reused.
        if pid_alive(pid) and _runs(pid, process["argv0"]):
            stop_process_group(pid)
            stopped.append(process["name"])
    state_file.unlink()
    return stopped


def _runs(pid: int, argv0: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().split(b"\0", 1)[0].decode() == argv0
    except OSError:
        return False
