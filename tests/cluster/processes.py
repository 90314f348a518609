"""Starting, watching and stopping the harness's server processes.

Every process gets its own process group so that stopping it also stops whatever it forked, and
its output goes to a log file that a failing test can show.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
_PR_SET_PDEATHSIG = 1


class MissingBinaryError(RuntimeError):
    pass


def bin_dir() -> Path:
    """Where ``make cluster-tools`` puts the binaries: $CC_CACHE_DIR/bin, else the repo's .cache/bin."""
    cache = os.environ.get("CC_CACHE_DIR")
    return Path(cache) / "bin" if cache else REPO_ROOT / ".cache" / "bin"


def find_binary(name: str, directory: Path | None = None) -> Path:
    path = (directory or bin_dir()) / name
    if not os.access(path, os.X_OK):
        raise MissingBinaryError(
            f"{path} is missing: run `make cluster-tools` (tests/cluster/tools/build.sh CACHE_DIR) first"
        )
    return path


def free_port() -> int:
    """A loopback port nobody listens on right now (the kernel picks it; a race is unlikely here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    # Linux only: the child gets SIGTERM when the test process dies, so a killed pytest leaves no
    # control plane behind. A person's `cluster up` skips this so that the cluster outlives the CLI.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class ManagedProcess:
    name: str
    argv: Sequence[str]
    log_file: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    die_with_parent: bool = True
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    pid: int | None = None

    def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            log.write(f"\n==== {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                list(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(self.env) if self.env is not None else None,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return self.pid is not None and pid_alive(self.pid)

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited; last log lines:\n{tail(self.log_file)}")

    def stop(self, grace: float = 10.0) -> None:
        if self.pid is None:
            return
        stop_process_group(self.pid, grace)
        if self.popen is not None:
            self.popen.wait(timeout=5)
        self.popen = None
        self.pid = None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_process_group(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the group led by ``pid``, then SIGKILL what is left after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                # Reap it if it is our child; otherwise just poll.
                finished, _ = os.waitpid(pid, os.WNOHANG)
                if finished == pid:
                    break
            except ChildProcessError:
                if not pid_alive(pid):
                    break
            time.sleep(0.05)
        else:
            continue
        # The leader is gone; make sure stragglers of its group are too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        return


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} unreadable)"
    return "\n".join(text.splitlines()[-lines:])


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    description: str,
    interval: float = 0.1,
    processes: Sequence[ManagedProcess] = (),
) -> None:
    """Poll ``check``; fail early, with its log, if one of ``processes`` died meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        for process in processes:
            process.check_alive()
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, ssl.SSLError):
            pass
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name} ({p.log_file}):\n{tail(p.log_file)}" for p in processes)
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {description}\n{logs}")
        time.sleep(interval)


def http_ok(url: str, context: ssl.SSLContext | None = None, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            status: int = response.status
            return status == 200
    except urllib.error.HTTPError:
        return False
