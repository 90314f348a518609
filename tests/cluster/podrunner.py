"""A test-only kubelet for one "local" node: pods bound to it run as real processes on this machine.

It registers the Node (pool ``local``, tainted so only pods that ask land there), renews its Lease,
watches the pods bound to it and runs each pod's first container: ``command`` + ``args`` with
``$(VAR)`` expansion, and the container's environment (``value``, ``fieldRef``, ``secretKeyRef``,
``configMapKeyRef``, ``envFrom``). The process runs in a fresh directory (also its HOME and cwd; an
image's ``workingDir`` does not exist here), and its exit code lands in the pod's
``containerStatuses[0].state.terminated.exitCode``. Output goes to ``WORK_DIR/NS_NAME_UID/container.log``.

Without a mount namespace, a volume (``configMap``, ``secret``, ``projected``, ``emptyDir``) is a
directory (``$TMPDIR/pod-UID``, removed with the pod), and its ``mountPath`` is rewritten to that
directory wherever it starts a path in the argv or the environment; ``terminationMessagePath``
likewise, and what the process writes there is the terminated state's message. Every pod here
shares the host's network and there is no cluster DNS: peers' names under the pod's own
``subdomain`` (its headless Service) are rewritten to the node's address.

Run as ``python -m tests.cluster.podrunner --kubeconfig K --node NAME --work-dir DIR`` (LocalCluster
does this with the node's own credentials, system:node:NAME, authorised by the Node authorizer).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import httpx

from tests.cluster.harness import LOCAL_POOL
from tests.cluster.kubeapi import ApiError, KubeApi, Obj, now_micro, now_rfc3339

LEASE_SECONDS = 40
LEASE_RENEW_SECONDS = 10
NODE_STATUS_SECONDS = 60
TERMINATION_MESSAGE_BYTES = 4096
_LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
_PR_SET_PDEATHSIG = 1
_FIELD_PATH = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")
_VAR_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
T = TypeVar("T")


class PodConfigError(Exception):
    """The pod asks for something this runner cannot provide (reported in the pod's status)."""


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, $$ escapes, the rest stays as is."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR_REFERENCE.sub(replace, text)


def retry_graph_lag(call: Callable[[], T], seconds: float = 15.0) -> T:
    """Retry a call the Node authorizer refuses for lack of a pod->node edge in its graph.

    The runner learns of a pod from its watch, which can be ahead of the authorizer's own view
    of the new binding, so a first GET of the pod (or of a Secret it uses) may be refused.
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except ApiError as error:
            if error.status_code != 403 or "no relationship found" not in error.message:
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def localizer(
    mounts: Mapping[str, str], subdomain: str | None, namespace: str, address: str
) -> Callable[[str], str]:
    """A function rewriting, in one pass, each mount path that starts a path (``/etc/x/f.yaml`` ->
    ``LOCAL/f.yaml``) and, for a pod with a ``subdomain``, each DNS name under it (``h.sub``,
    ``h.sub.ns.svc.cluster.local``) to ``address``. One pass, so a rewritten path is not rewritten again."""
    replacements: dict[str, str] = {}
    alternatives: list[str] = []
    for mount_path in sorted(mounts, key=len, reverse=True):
        alternatives.append(rf"(?P<m{len(alternatives)}>{re.escape(mount_path)})(?=/|$|[\s'\":;,])")
        replacements[f"m{len(alternatives) - 1}"] = mounts[mount_path]
    if subdomain:
        suffix = rf"\.{re.escape(subdomain)}(?:\.{re.escape(namespace)}(?:\.svc(?:\.cluster\.local)?)?)?"
        alternatives.append(rf"(?P<host>[a-z0-9](?:[-a-z0-9]*[a-z0-9])?{suffix})(?![\w.-])")
        replacements["host"] = address
    if not alternatives:
        return lambda text: text
    pattern = re.compile(r"(?<![\w./-])(?:" + "|".join(alternatives) + ")")

    def rewrite(match: re.Match[str]) -> str:
        return replacements[match.lastgroup or ""]

    return lambda text: pattern.sub(rewrite, text)


def _die_with_runner() -> None:
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class PodProcess(threading.Thread):
    """Runs one pod to its end and reports its status; ``terminate`` is the kubelet's kill on delete."""

    def __init__(self, runner: PodRunner, pod: Obj) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.runner = runner
        self.api = runner.api
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.pod = pod
        self.path = f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}"
        self.directory = runner.work_dir / f"{self.namespace}_{self.pod_name}_{self.uid}"
        self.log_file = self.directory / "container.log"
        self.termination_file = self.directory / "termination-log"
        # Short, as a container's /tmp is: a unix socket path (DataLoader workers, torch) must stay
        # under 108 bytes, which the pod directory under pytest's basetemp is not. Removed with the pod.
        self.volumes_dir = Path(tempfile.gettempdir()) / f"pod-{self.uid[:18]}"
        self._token_value = ""
        self.terminating = threading.Event()
        self.grace_seconds = 30.0
        self._popen: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    # -- the pod's command and environment --

    def _fetch(self, kind: str, name: str) -> Obj | None:
        return retry_graph_lag(
            lambda: self.api.get_or_none(f"/api/v1/namespaces/{self.namespace}/{kind}/{name}")
        )

    def _key_value(self, kind: str, ref: Obj) -> str | None:
        obj = self._fetch(kind, ref["name"])
        data = (obj or {}).get("data") or {}
        if ref["key"] in data:
            value: str = data[ref["key"]]
            return base64.b64decode(value).decode() if kind == "secrets" else value
        if ref.get("optional"):
            return None
        raise PodConfigError(f"{kind[:-1]} {ref['name']!r} has no key {ref['key']!r}")

    def _field(self, field_path: str) -> str:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        simple = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": spec.get("nodeName", ""),
            "spec.serviceAccountName": spec.get("serviceAccountName", ""),
            "status.hostIP": self.runner.node_ip,
            "status.podIP": self.runner.node_ip,
            "status.podIPs": self.runner.node_ip,
            "status.hostIPs": self.runner.node_ip,
        }
        if field_path in simple:
            return str(simple[field_path])
        match = _FIELD_PATH.match(field_path)
        if match:
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        raise PodConfigError(f"fieldRef {field_path!r} is not supported by the pod runner")

    def environment(self, container: Obj) -> dict[str, str]:
        declared: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for kind, key in (("configmaps", "configMapRef"), ("secrets", "secretRef")):
                if key not in source:
                    continue
                obj = self._fetch(kind, source[key]["name"])
                if obj is None:
                    if source[key].get("optional"):
                        continue
                    raise PodConfigError(f"{kind[:-1]} {source[key]['name']!r} not found")
                for data_key, data in (obj.get("data") or {}).items():
                    declared[prefix + data_key] = (
                        base64.b64decode(data).decode() if kind == "secrets" else data
                    )
        for item in container.get("env") or []:
            name = item["name"]
            if "valueFrom" not in item:
                declared[name] = expand(item.get("value", ""), declared)
                continue
            source = item["valueFrom"]
            value: str | None
            if "fieldRef" in source:
                value = self._field(source["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in source:
                value = self._key_value("secrets", source["secretKeyRef"])
            elif "configMapKeyRef" in source:
                value = self._key_value("configmaps", source["configMapKeyRef"])
            else:
                raise PodConfigError(
                    f"env {name!r}: only fieldRef, secretKeyRef, configMapKeyRef are supported"
                )
            if value is not None:
                declared[name] = value
        return declared

    def _command(self, container: Obj, declared: Mapping[str, str]) -> list[str]:
        argv = [
            expand(part, declared)
            for part in (container.get("command") or []) + (container.get("args") or [])
        ]
        if not container.get("command"):
            raise PodConfigError("the pod runner has no images: the container needs an explicit command")
        return argv

    def _process_env(self, declared: Mapping[str, str]) -> dict[str, str]:
        # Not the runner's environment: only what a container would have, plus a PATH that finds
        # this virtualenv's console scripts (the "image" is this checkout).
        env = {
            "PATH": os.pathsep.join(
                [str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")]
            ),
            "HOME": str(self.directory / "work"),
            "TMPDIR": str(self.directory / "tmp"),
            "LANG": "C.UTF-8",
            "HOSTNAME": self.pod_name,
        }
        env.update(self.runner.extra_env)
        kubeconfig = self._service_account_kubeconfig()
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        env.update(declared)
        return env

    def _service_account_kubeconfig(self) -> Path | None:
        """The pod's ServiceAccount identity, as a kubeconfig (no path to mount a token file at).

        The token is a TokenRequest bound to this pod, as the kubelet gets it, so a client run here
        (an operator, a worker) has exactly the RBAC its ServiceAccount has.
        """
        spec = self.pod["spec"]
        if spec.get("automountServiceAccountToken") is False:
            return None
        account = spec.get("serviceAccountName") or "default"
        credentials = self.api.credentials
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "cluster",
                    "cluster": {"server": credentials.server, "certificate-authority": credentials.ca_file},
                }
            ],
            "users": [{"name": account, "user": {"token": self._token()}}],
            "contexts": [
                {
                    "name": "pod",
                    "context": {"cluster": "cluster", "user": account, "namespace": self.namespace},
                }
            ],
            "current-context": "pod",
        }
        kubeconfig = self.directory / "serviceaccount.kubeconfig"
        kubeconfig.write_text(json.dumps(config))
        kubeconfig.chmod(0o600)
        return kubeconfig

    def _token(self) -> str:
        """A TokenRequest token for the pod's ServiceAccount, bound to the pod (made once)."""
        if self._token_value:
            return self._token_value
        account = self.pod["spec"].get("serviceAccountName") or "default"
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": 6 * 3600,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.pod_name, "uid": self.uid},
            },
        }
        path = f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token"
        self._token_value = str(retry_graph_lag(lambda: self.api.create(path, request))["status"]["token"])
        return self._token_value

    # -- the pod's files and peers' names --

    def _volumes(self, container: Obj) -> dict[str, str]:
        """mountPath -> the local directory standing in for it, with each volume's files written."""
        volumes = {volume["name"]: volume for volume in self.pod["spec"].get("volumes") or []}
        mounts: dict[str, str] = {}
        for mount in container.get("volumeMounts") or []:
            name = mount["name"]
            if mount.get("subPath") or mount.get("subPathExpr"):
                raise PodConfigError(f"volumeMount {name!r}: subPath is not supported by the pod runner")
            volume = volumes.get(name)
            if volume is None:
                raise PodConfigError(f"volumeMount {name!r} names no volume of the pod")
            local = self.volumes_dir / name
            local.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                self._write_items(local, "configmaps", volume["configMap"])
            elif "secret" in volume:
                secret = volume["secret"]
                self._write_items(local, "secrets", {**secret, "name": secret["secretName"]})
            elif "projected" in volume:
                self._write_projected(local, volume["projected"])
            elif "emptyDir" not in volume:
                raise PodConfigError(
                    f"volume {name!r}: only configMap, secret, projected and emptyDir volumes are supported"
                )
            mounts[mount["mountPath"].rstrip("/") or "/"] = str(local)
        mounts[container.get("terminationMessagePath") or "/dev/termination-log"] = str(self.termination_file)
        return mounts

    def _write_projected(self, target: Path, projected: Obj) -> None:
        """The sources the kube-api-access volume uses: a token, a ConfigMap, downward API fields."""
        for source in projected.get("sources") or []:
            if "serviceAccountToken" in source:
                (target / source["serviceAccountToken"]["path"]).write_text(self._token())
            elif "configMap" in source:
                self._write_items(target, "configmaps", source["configMap"])
            elif "secret" in source:
                self._write_items(target, "secrets", source["secret"])
            elif "downwardAPI" in source:
                for item in source["downwardAPI"].get("items") or []:
                    if "fieldRef" not in item:
                        raise PodConfigError("downwardAPI volume items: only fieldRef is supported")
                    (target / item["path"]).write_text(self._field(item["fieldRef"]["fieldPath"]))
            else:
                raise PodConfigError(f"projected volume source {sorted(source)} is not supported")

    def _write_items(self, target: Path, kind: str, source: Obj) -> None:
        obj = self._fetch(kind, source["name"])
        if obj is None:
            if source.get("optional"):
                return
            raise PodConfigError(f"{kind[:-1]} {source['name']!r} not found")
        data = obj.get("data") or {}
        for item in source.get("items") or [{"key": key, "path": key} for key in data]:
            if item["key"] not in data:
                raise PodConfigError(f"{kind[:-1]} {source['name']!r} has no key {item['key']!r}")
            value = data[item["key"]]
            path = target / item["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(base64.b64decode(value) if kind == "secrets" else value.encode())

    def localize(self, mounts: Mapping[str, str]) -> Callable[[str], str]:
        """The rewrite of one argv word or env value: mount paths and peers' DNS names made local."""
        return localizer(
            mounts,
            subdomain=self.pod["spec"].get("subdomain"),
            namespace=self.namespace,
            address=self.runner.node_ip,
        )

    # -- status reporting --

    def _update_status(self, change: Callable[[Obj], bool | None]) -> Obj | None:
        """Apply ``change`` to the pod's current status and write it; ``change`` returns False to skip."""

        def mutate(pod: Obj) -> bool:
            if pod["metadata"]["uid"] != self.uid:
                return False
            return change(pod.setdefault("status", {})) is not False

        return retry_graph_lag(lambda: self.api.update_with_retry(self.path, mutate, subresource="status"))

    def _set_conditions(self, status: Obj, ready: bool, reason: str | None = None) -> None:
        now = now_rfc3339()
        wanted = {
            "PodReadyToStartContainers": True,
            "Initialized": True,
            "ContainersReady": ready,
            "Ready": ready,
        }
        conditions = [c for c in status.get("conditions") or [] if c["type"] not in wanted]
        previous = {c["type"]: c for c in status.get("conditions") or []}
        for condition_type, value in wanted.items():
            text = "True" if value else "False"
            old = previous.get(condition_type)
            entry = {"type": condition_type, "status": text, "lastProbeTime": None}
            entry["lastTransitionTime"] = old["lastTransitionTime"] if old and old["status"] == text else now
            if reason and not value:
                entry["reason"] = reason
            conditions.append(entry)
        status["conditions"] = conditions

    def _container_statuses(self, state: Obj, restarts: int, last_state: Obj | None) -> list[Obj]:
        containers = self.pod["spec"]["containers"]
        first = {
            "name": containers[0]["name"],
            "image": containers[0].get("image", ""),
            "imageID": "",
            "containerID": f"podrunner://{self.uid}",
            "ready": "running" in state,
            "started": "running" in state,
            "restartCount": restarts,
            "state": state,
            "lastState": last_state or {},
        }
        others = [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": "",
                "ready": False,
                "started": False,
                "restartCount": 0,
                "state": {
                    "waiting": {"reason": "NotRunByPodRunner", "message": "only the first container runs"}
                },
                "lastState": {},
            }
            for c in containers[1:]
        ]
        return [first, *others]

    def _report_running(self, started_at: str, restarts: int, last_state: Obj | None) -> None:
        def change(status: Obj) -> None:
            status["phase"] = "Running"
            status.setdefault("startTime", started_at)
            status["hostIP"] = self.runner.node_ip
            status["hostIPs"] = [{"ip": self.runner.node_ip}]
            status["podIP"] = self.runner.node_ip
            status["podIPs"] = [{"ip": self.runner.node_ip}]
            self._set_conditions(status, ready=True)
            status["containerStatuses"] = self._container_statuses(
                {"running": {"startedAt": started_at}}, restarts, last_state
            )

        self._update_status(change)

    def _terminated_state(self, exit_code: int, started_at: str) -> Obj:
        terminated: Obj = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": started_at,
            "finishedAt": now_rfc3339(),
            "containerID": f"podrunner://{self.uid}",
        }
        message = self._termination_message()
        if message:
            terminated["message"] = message
        elif exit_code != 0:
            # terminationMessagePolicy FallbackToLogsOnError, as most workloads want it.
            terminated["message"] = self._log_tail()
        return {"terminated": terminated}

    def _report_finished(self, exit_code: int, started_at: str, restarts: int) -> None:
        state = self._terminated_state(exit_code, started_at)

        def change(status: Obj) -> None:
            status["phase"] = "Succeeded" if exit_code == 0 else "Failed"
            status.setdefault("startTime", started_at)
            self._set_conditions(
                status, ready=False, reason="PodCompleted" if exit_code == 0 else "PodFailed"
            )
            status["containerStatuses"] = self._container_statuses(state, restarts, None)

        self._update_status(change)

    def _report_config_error(self, message: str) -> None:
        def change(status: Obj) -> None:
            status["phase"] = "Failed"
            status["reason"] = "PodRunnerConfigError"
            status["message"] = message
            self._set_conditions(status, ready=False, reason="PodFailed")
            state = {"terminated": {"exitCode": 128, "reason": "ContainerCannotRun", "message": message}}
            status["containerStatuses"] = self._container_statuses(state, 0, None)

        self._update_status(change)

    def _termination_message(self) -> str:
        try:
            with self.termination_file.open("rb") as message:
                return message.read(TERMINATION_MESSAGE_BYTES).decode(errors="replace")
        except OSError:
            return ""

    def _log_tail(self) -> str:
        try:
            with self.log_file.open("rb") as log:
                log.seek(0, os.SEEK_END)
                size = log.tell()
                log.seek(max(0, size - TERMINATION_MESSAGE_BYTES))
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    # -- running --

    def run(self) -> None:
        try:
            self._run()
        except Exception as error:  # the thread must not die silently: say why in the runner's log
            print(f"pod {self.namespace}/{self.pod_name}: runner error: {error!r}", flush=True)
        finally:
            shutil.rmtree(self.volumes_dir, ignore_errors=True)
            self.runner.forget(self.uid)

    def _run(self) -> None:
        container = self.pod["spec"]["containers"][0]
        for sub in ("work", "tmp"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        try:
            declared = self.environment(container)
            argv = self._command(container, declared)
            local = self.localize(self._volumes(container))
            argv = [local(word) for word in argv]
            env = self._process_env({key: local(value) for key, value in declared.items()})
        except (PodConfigError, ApiError) as error:
            self._report_config_error(str(error))
            self._finish_deletion()
            return
        restart_policy = self.pod["spec"].get("restartPolicy", "Always")
        restarts = 0
        last_state: Obj | None = None
        while True:
            started_at = now_rfc3339()
            exit_code = self._execute(argv, env, started_at, restarts, last_state)
            retry = restart_policy == "Always" or (restart_policy == "OnFailure" and exit_code != 0)
            if self.terminating.is_set() or not retry:
                break
            restarts += 1
            last_state = self._terminated_state(exit_code, started_at)
            # CrashLoopBackOff in miniature: long enough not to spin, short enough for tests.
            if self.terminating.wait(min(2.0**restarts, 10.0)):
                break
        self._report_finished(exit_code, started_at, restarts)
        self._finish_deletion()

    def _execute(
        self, argv: list[str], env: dict[str, str], started_at: str, restarts: int, last: Obj | None
    ) -> int:
        with self.log_file.open("ab") as log, self._lock:
            if self.terminating.is_set():
                return 137
            try:
                self._popen = subprocess.Popen(
                    argv,
                    cwd=self.directory / "work",
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_runner,
                )
            except OSError as error:
                log.write(f"podrunner: cannot start {argv[0]!r}: {error}\n".encode())
                return 127
        self._report_running(started_at, restarts, last)
        exit_code = self._popen.wait()
        # A signal death reads as 128+N, as a container runtime reports it.
        return 128 - exit_code if exit_code < 0 else exit_code

    def terminate(self, grace_seconds: float) -> None:
        """SIGTERM the pod's process group; SIGKILL it after the pod's grace period."""
        self.grace_seconds = grace_seconds
        with self._lock:
            self.terminating.set()
            popen = self._popen
        if popen is None or popen.poll() is not None:
            return
        _signal_group(popen.pid, signal.SIGTERM)
        threading.Timer(grace_seconds, _signal_group, (popen.pid, signal.SIGKILL)).start()

    def _finish_deletion(self) -> None:
        """A deleted pod is removed for good once its process is gone (the kubelet's final delete)."""
        current = retry_graph_lag(lambda: self.api.get_or_none(self.path))
        if (
            current
            and current["metadata"]["uid"] == self.uid
            and current["metadata"].get("deletionTimestamp")
        ):
            self.runner.delete_pod(current)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


class PodRunner:
    def __init__(self, api: KubeApi, node_name: str, work_dir: Path, extra_env: Mapping[str, str]) -> None:
        self.api = api
        self.node_name = node_name
        self.work_dir = work_dir
        self.extra_env = dict(extra_env)
        self.node_ip = "127.0.0.1"
        self.stopping = threading.Event()
        self._pods: dict[str, PodProcess] = {}
        self._finished: set[str] = set()
        self._pods_lock = threading.Lock()

    # -- node --

    def _node_status(self) -> Obj:
        now = now_rfc3339()
        memory_kib = _memory_kib()
        # Requests are not enforced here; a floor of 8 CPUs lets a CPU training pod (2 CPUs) and the
        # stage pods fit on a small machine.
        cpus = max(os.cpu_count() or 1, 8)
        resources = {"cpu": str(cpus), "memory": f"{memory_kib}Ki", "pods": "110"}

        def cond(condition_type: str, status: str, reason: str, message: str) -> Obj:
            return {
                "type": condition_type,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }

        return {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "podrunner"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "podrunner"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "podrunner"),
                cond("Ready", "True", "KubeletReady", "test pod runner is running pods as local processes"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": self.node_ip},
                {"type": "Hostname", "address": self.node_name},
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "podrunner",
                "kubeProxyVersion": "",
                "containerRuntimeVersion": "podrunner://0",
                "kernelVersion": os.uname().release,
                "osImage": "local processes",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }

    def register_node(self) -> Obj:
        path = f"/api/v1/nodes/{self.node_name}"
        node = self.api.get_or_none(path)
        if node is None:
            node = self.api.create(
                "/api/v1/nodes",
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": self.node_name, "labels": LOCAL_POOL.node_labels(self.node_name)},
                    "spec": {"taints": [dict(t) for t in LOCAL_POOL.taints]},
                },
            )
        self._post_node_status()
        return node

    def _post_node_status(self) -> None:
        status = self._node_status()

        def mutate(node: Obj) -> bool:
            previous = {c["type"]: c for c in node.get("status", {}).get("conditions") or []}
            for item in status["conditions"]:
                old = previous.get(item["type"])
                if old and old.get("status") == item["status"]:
                    item["lastTransitionTime"] = old["lastTransitionTime"]
            node["status"] = {**node.get("status", {}), **status}
            return True

        self.api.update_with_retry(f"/api/v1/nodes/{self.node_name}", mutate, subresource="status")

    def _renew_lease(self, node_uid: str) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}"
        spec = {
            "holderIdentity": self.node_name,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": now_micro(),
        }
        lease = self.api.get_or_none(path)
        if lease is None:
            self.api.create(
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {
                        "name": self.node_name,
                        "namespace": "kube-node-lease",
                        # As a kubelet does: the lease goes when the node object goes.
                        "ownerReferences": [
                            {"apiVersion": "v1", "kind": "Node", "name": self.node_name, "uid": node_uid}
                        ],
                    },
                    "spec": spec,
                },
            )
        else:
            lease["spec"].update(spec)
            self.api.replace(path, lease)

    def heartbeat_forever(self, node_uid: str) -> None:
        last_status = time.monotonic()
        while not self.stopping.wait(LEASE_RENEW_SECONDS):
            try:
                self._renew_lease(node_uid)
                if time.monotonic() - last_status > NODE_STATUS_SECONDS:
                    self._post_node_status()
                    last_status = time.monotonic()
            except (ApiError, httpx.HTTPError) as error:
                print(f"heartbeat failed: {error}", flush=True)

    # -- pods --

    def forget(self, uid: str) -> None:
        """The pod's process is done; later events about it must not start or fail it again."""
        with self._pods_lock:
            self._pods.pop(uid, None)
            self._finished.add(uid)

    def delete_pod(self, pod: Obj) -> None:
        meta = pod["metadata"]
        try:
            self.api.delete(
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
            )
        except ApiError as error:
            if error.status_code != 409:  # 409: a newer pod of that name, not ours to delete
                raise

    def handle(self, pod: Obj) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        phase = pod.get("status", {}).get("phase", "Pending")
        with self._pods_lock:
            worker = self._pods.get(uid)
            if worker is not None:
                if meta.get("deletionTimestamp"):
                    worker.terminate(float(meta.get("deletionGracePeriodSeconds") or 30))
                return
            if meta.get("deletionTimestamp"):
                self._finalize_unknown(pod, phase)
                return
            # The watch can lag behind our own status writes: an event still saying "Running" for a
            # pod whose process already ended here is old news.
            if uid in self._finished:
                return
            if phase != "Pending":
                if phase == "Running":
                    self._fail_orphan(pod)
                return
            worker = PodProcess(self, pod)
            self._pods[uid] = worker
        worker.start()

    def _finalize_unknown(self, pod: Obj, phase: str) -> None:
        """A deleted pod with no process here: end it as Failed (if it was not done) and remove it."""
        if phase not in ("Succeeded", "Failed"):
            self._fail_orphan(pod)
        self.delete_pod(pod)

    def _fail_orphan(self, pod: Obj) -> None:
        # A pod that was Running under an earlier runner: its process is gone with that runner.
        worker = PodProcess(self, pod)

        def change(status: Obj) -> bool:
            if status.get("phase") in ("Succeeded", "Failed"):
                return False
            status["phase"] = "Failed"
            status["reason"] = "PodRunnerRestarted"
            status["message"] = "the pod runner restarted; the process it ran is gone"
            worker._set_conditions(status, ready=False, reason="PodFailed")
            return True

        worker._update_status(change)

    def watch_forever(self) -> None:
        path = "/api/v1/pods"
        selector = {"fieldSelector": f"spec.nodeName={self.node_name}"}
        while not self.stopping.is_set():
            try:
                listing = self.api.get(path, params=selector)
                for pod in listing["items"]:
                    self.handle(pod)
                version = listing["metadata"]["resourceVersion"]
                while not self.stopping.is_set():
                    for event in self.api.watch(path, params={**selector, "resourceVersion": version}):
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            raise _Relist(obj.get("message", "watch error"))
                        version = obj["metadata"]["resourceVersion"]
                        if event["type"] in ("ADDED", "MODIFIED"):
                            self.handle(obj)
                        elif event["type"] == "DELETED":
                            with self._pods_lock:
                                worker = self._pods.get(obj["metadata"]["uid"])
                            if worker is not None:
                                worker.terminate(0)
            except (_Relist, ApiError, httpx.HTTPError) as error:
                print(f"watch restarting: {error}", flush=True)
                time.sleep(0.5)

    def kill_all(self) -> None:
        with self._pods_lock:
            workers = list(self._pods.values())
        for worker in workers:
            worker.terminate(0)


class _Relist(Exception):
    pass


def _memory_kib() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return 8 * 1024 * 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE given to every pod process")
    options = parser.parse_args(argv)
    extra_env = dict(item.split("=", 1) for item in options.env)
    options.work_dir.mkdir(parents=True, exist_ok=True)
    runner = PodRunner(KubeApi.from_kubeconfig(options.kubeconfig), options.node, options.work_dir, extra_env)

    def stop(signum: int, frame: object) -> None:
        runner.stopping.set()
        runner.kill_all()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    node = runner.register_node()
    runner._renew_lease(node["metadata"]["uid"])
    threading.Thread(target=runner.heartbeat_forever, args=(node["metadata"]["uid"],), daemon=True).start()
    print(f"pod runner for node {options.node} ready; work dir {options.work_dir}", flush=True)
    runner.watch_forever()


if __name__ == "__main__":
    main()
