"""Start the test control plane for a person: ``python -m tests.cluster.cli up`` / ``down``.

``up`` starts etcd, the Kubernetes control plane, kwok, the local pod runner and MinIO, all in the
background with their state and logs under ``.cache/cluster/``, prints the shell lines to use them,
and returns. ``down`` stops every process it recorded.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from tests.cluster.harness import STATE_FILE, LocalCluster, stop_from_state
from tests.cluster.minio import MinioServer
from tests.cluster.processes import REPO_ROOT, MissingBinaryError, bin_dir

DEFAULT_STATE_DIR = REPO_ROOT / ".cache" / "cluster"
MINIO_STATE = "minio.json"


def up(options: argparse.Namespace) -> int:
    state_dir: Path = options.state_dir
    if (state_dir / STATE_FILE).exists():
        print(f"a cluster is already recorded in {state_dir}; run `down` first", file=sys.stderr)
        return 1
    started = time.monotonic()
    cluster = LocalCluster(
        state_dir,
        cpu_nodes=options.cpu_nodes,
        a100_nodes=options.a100_nodes,
        local_nodes=options.local_nodes,
        pod_run_seconds=options.pod_run_seconds,
        detached=True,
    )
    try:
        cluster.start()
    except MissingBinaryError as error:
        print(error, file=sys.stderr)
        return 1
    exports = {"KUBECONFIG": str(cluster.kubeconfig), "PATH": f"{bin_dir()}:$PATH"}
    if options.minio:
        minio = MinioServer(state_dir / "minio" / "data", log_dir=cluster.logs_dir, die_with_parent=False)
        minio.start()
        record = {"name": "minio", "pid": minio.pid, "argv0": str(minio.binary)}
        (state_dir / MINIO_STATE).write_text(json.dumps({"processes": [record]}))
        exports.update(minio.env())
    print(f"# cluster up in {time.monotonic() - started:.1f}s; logs in {cluster.logs_dir}")
    for key, value in exports.items():
        quoted = value if key == "PATH" else shlex.quote(value)
        print(f"export {key}={quoted}")
    return 0


def down(options: argparse.Namespace) -> int:
    state_dir: Path = options.state_dir
    stopped = stop_from_state(state_dir / MINIO_STATE) + stop_from_state(state_dir / STATE_FILE)
    print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.cli", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    commands = parser.add_subparsers(dest="command", required=True)
    up_parser = commands.add_parser("up", help="start the cluster in the background")
    up_parser.add_argument("--cpu-nodes", type=int, default=2)
    up_parser.add_argument("--a100-nodes", type=int, default=2)
    up_parser.add_argument("--local-nodes", type=int, default=1)
    up_parser.add_argument("--pod-run-seconds", type=float, default=5.0, help="how long a fake Job pod runs")
    up_parser.add_argument("--no-minio", dest="minio", action="store_false", help="do not start MinIO")
    commands.add_parser("down", help="stop what `up` started")
    options = parser.parse_args(argv)
    options.state_dir = options.state_dir.resolve()
    return up(options) if options.command == "up" else down(options)


if __name__ == "__main__":
    sys.exit(main())
