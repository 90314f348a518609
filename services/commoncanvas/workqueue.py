"""Workers, not units, are pods: W long-lived workers pull a stage's units until none is left.

A worker claims unit `u` by creating `_claims/{u:06d}/{a:03d}.json` for attempt `a` with a conditional
create (S3 `If-None-Match: *`, `link(2)` locally): of workers racing for an attempt, exactly one wins.
The winner holds the claim with a lease it renews (rewrites its own claim with a later `expires`); a
claim whose lease ran out (the worker died, was paused or cut off), that failed or was released is
taken over by creating attempt `a + 1`. Each attempt writes under its own prefix and publishes by
creating the unit's marker conditionally (`units.publish_marker`), so a zombie attempt can never
overwrite a published unit nor publish it twice; before publishing it also checks that no later
attempt exists. A unit that failed `MAX_FAILED_ATTEMPTS` times is given up and reported.

Which unit next: a worker first walks its own contiguous range (`index * U // W` onwards, no listing
needed); when a claim fails or its range is spent, it lists `_claims/` and `_units/` once (U/1000
requests each) and steals the upper half of the longest unclaimed run, so two workers rarely meet
twice. With nothing unclaimed it takes over expired or failed claims, waits while others' leases
live, and exits once every unit is settled.

Progress is one object per worker, `_workers/{worker}.json` (units it published, samples, model
loads), rewritten after each unit: the operator reads W objects, not U markers.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from commoncanvas import metrics, units
from commoncanvas.storage import Storage, StorageError

log = logging.getLogger(__name__)

CLAIMS = "_claims"
WORKERS = "_workers"
LEASE_ENV = "COMMONCANVAS_LEASE_SECONDS"
DEFAULT_LEASE_SECONDS = 120.0
MAX_FAILED_ATTEMPTS = 3
# How long store errors (an object store restarting, a partition) are waited out before a worker gives
# up; boto3 retries each request on its own first. A store error is never a unit's failure.
PATIENCE_ENV = "COMMONCANVAS_STORE_PATIENCE_SECONDS"
DEFAULT_STORE_PATIENCE_SECONDS = 600.0


def lease_seconds() -> float:
    return float(os.environ.get(LEASE_ENV) or DEFAULT_LEASE_SECONDS)


def store_patience() -> float:
    return float(os.environ.get(PATIENCE_ENV) or DEFAULT_STORE_PATIENCE_SECONDS)


def claim_key(unit: int, attempt: int) -> str:
    return f"{CLAIMS}/{unit:06d}/{attempt:03d}.json"


class UnitsGivenUp(RuntimeError):
    """Some units failed on every attempt; every other unit is done."""


class TransientUnitError(RuntimeError):
    """A unit could not finish for reasons outside it (its image host down, say): not one of its
    failed attempts. It is handed back and retried after a backoff, like a store error."""


class StageWorker(Protocol):
    """One stage's part: its unit count, its model (loaded once, before the first unit the worker
    claims, and kept for every later one) and how one attempt of a unit runs."""

    stage: str
    output: Storage

    def total_units(self) -> int: ...

    def load_model(self) -> bool:
        """Load the stage's model; False when the stage has none."""
        ...

    def run_attempt(self, unit: int, attempt: int) -> dict[str, Any]:
        """Write the attempt's output under `units.attempt_dir(split, unit, attempt)` and return its
        stats (at least `unit`, `split`, `written`, `outcomes`, `licenses`, `seconds`)."""
        ...


def _patiently(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, store errors retried with backoff for up to the store patience."""
    retrying = Retrying(
        retry=retry_if_exception_type(StorageError),
        wait=wait_exponential(multiplier=0.5, max=15),
        stop=stop_after_delay(store_patience()),
        reraise=True,
    )
    return retrying(fn, *args)


# --- what the store says about the units --------------------------------------------------------


@dataclass
class Board:
    """One listing of the claims and markers: done units and each claimed unit's attempts."""

    total: int
    done: set[int] = field(default_factory=set)
    attempts: dict[int, list[int]] = field(default_factory=dict)

    @classmethod
    def read(cls, storage: Storage, total: int) -> Board:
        board = cls(total, units.done_units(storage))
        for key in storage.list(CLAIMS):
            parts = key.split("/")
            if len(parts) == 3 and parts[2].endswith(".json"):
                board.attempts.setdefault(int(parts[1]), []).append(int(parts[2][:-5]))
        for attempts in board.attempts.values():
            attempts.sort()
        return board

    def unclaimed(self) -> list[int]:
        return [u for u in range(self.total) if u not in self.done and u not in self.attempts]

    def open_claims(self) -> list[int]:
        return sorted(u for u in self.attempts if u not in self.done)


def longest_run_upper_half(unclaimed: list[int]) -> list[int]:
    """The upper half of the longest run of consecutive unclaimed units (all of it when short): the
    worker that owns the run keeps walking the lower half, and the two do not meet until it is done."""
    best: list[int] = []
    run: list[int] = []
    for unit in unclaimed:
        if run and unit != run[-1] + 1:
            run = []
        run.append(unit)
        if len(run) > len(best):
            best = list(run)
    return best[len(best) // 2 :] if len(best) > 1 else best


def read_claim(storage: Storage, unit: int, attempt: int) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(storage.read_text(claim_key(unit, attempt)))
    except (FileNotFoundError, ValueError):
        return {}  # a claim being created or rewritten: treat it as live for now
    return data


# --- one worker ---------------------------------------------------------------------------------


@dataclass
class Identity:
    """Who a worker is: its index among the stage's workers, its replica in the pod (one per GPU)."""

    index: int = 0
    count: int = 1
    replica: int = 0
    device: str = ""
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            host = socket.gethostname().split(".")[0][:40]
            self.name = f"w{self.index:04d}-r{self.replica}-{host}-{uuid.uuid4().hex[:8]}"


class Lease:
    """A held claim: renewed in the background until closed; `close(state)` records the outcome."""

    def __init__(self, storage: Storage, unit: int, attempt: int, body: dict[str, Any], seconds: float):
        self.storage, self.unit, self.attempt, self.body, self.seconds = storage, unit, attempt, body, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{unit}", daemon=True)
        self._thread.start()

    def _write(self, **changes: Any) -> None:
        self.body.update({"expires": time.time() + self.seconds, **changes})
        self.storage.write_text(claim_key(self.unit, self.attempt), json.dumps(self.body))

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self._write()
            except Exception as error:  # the next renewal may get through; expiry is the backstop
                log.warning("renewing the lease on unit %d: %s", self.unit, error)

    def superseded(self) -> bool:
        """Another worker took this unit over (it thought this one dead): do not publish."""
        return bool(_patiently(self.storage.exists, claim_key(self.unit, self.attempt + 1)))

    def close(self, state: str, error: str = "") -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._write(state=state, error=error[:2000], expires=0)
        except Exception as exc:
            log.warning("recording unit %d as %s: %s", self.unit, state, exc)


@dataclass
class WorkerProgress:
    """`_workers/{name}.json`: what one worker has done, rewritten after each unit."""

    storage: Storage
    identity: Identity
    stage: str
    started: float = field(default_factory=time.time)
    published: list[int] = field(default_factory=list)
    written: int = 0
    busy_seconds: float = 0.0
    model_loads: int = 0
    lost: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    state: str = "running"

    def save(self) -> None:
        body = {
            "worker": self.identity.name,
            "index": self.identity.index,
            "replica": self.identity.replica,
            "device": self.identity.device,
            # What CUDA in this process sees: the replica's one device.
            "visibleDevices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "stage": self.stage,
            "state": self.state,
            "started": self.started,
            "updated": time.time(),
            "units": self.published,
            "written": self.written,
            "busySeconds": round(self.busy_seconds, 3),
            "modelLoads": self.model_loads,
            "lost": self.lost,
            "failed": self.failed,
        }
        try:
            _patiently(self.storage.write_text, f"{WORKERS}/{self.identity.name}.json", json.dumps(body))
        except StorageError as error:  # progress is advisory; the markers are the truth
            log.warning("writing progress of %s: %s", self.identity.name, error)


class Worker:
    """Claims, runs and publishes units of one stage until every unit is settled."""

    def __init__(self, stage: StageWorker, identity: Identity, lease: float | None = None) -> None:
        self.stage = stage
        self.storage = stage.output
        self.identity = identity
        self.lease_seconds = lease if lease is not None else lease_seconds()
        self.total = stage.total_units()
        self.progress = WorkerProgress(self.storage, identity, stage.stage)
        self.current: Lease | None = None
        self.store_trouble_since = 0.0
        self.store_retries = 0
        self.model_loaded = False

    def own_range(self) -> list[int]:
        count = max(1, self.identity.count)
        index = self.identity.index % count
        return list(range(index * self.total // count, (index + 1) * self.total // count))

    def _claim(self, unit: int, attempt: int) -> Lease | None:
        body = {
            "worker": self.identity.name,
            "unit": unit,
            "attempt": attempt,
            "state": "running",
            "claimed": time.time(),
            "expires": time.time() + self.lease_seconds,
        }
        created = _patiently(self.storage.create, claim_key(unit, attempt), json.dumps(body).encode())
        # A create retried after its response was lost finds this worker's own claim.
        if not created and read_claim(self.storage, unit, attempt).get("worker") != self.identity.name:
            return None
        return Lease(self.storage, unit, attempt, body, self.lease_seconds)

    def _run(self, lease: Lease) -> None:
        unit, attempt = lease.unit, lease.attempt
        self.current = lease
        started = time.perf_counter()
        try:
            if _patiently(units.is_done, self.storage, unit):
                lease.close("done")
                return
            if not self.model_loaded:
                self.model_loaded = True
                if self.stage.load_model():
                    self.progress.model_loads += 1
                    metrics.MODEL_LOADS.labels(self.stage.stage).inc()
                    self.progress.save()
            stats = self.stage.run_attempt(unit, attempt)
            stats = {**stats, "attempt": attempt, "worker": self.identity.name}
            superseded = lease.superseded()
            if superseded:
                units.discard_attempt(self.storage, str(stats["split"]), unit, attempt)
            if superseded or not _patiently(units.publish_marker, self.storage, unit, stats):
                self.progress.lost += 1
                metrics.UNITS.labels(self.stage.stage, "lost").inc()
                log.warning("unit %d attempt %d: another attempt published first; discarded", unit, attempt)
                lease.close("lost")
                return
            seconds = time.perf_counter() - started
            self.store_trouble_since, self.store_retries = 0.0, 0
            self.progress.published.append(unit)
            self.progress.written += int(stats.get("written", 0))
            metrics.unit_finished(self.stage.stage, int(stats.get("written", 0)), seconds)
            lease.close("done")
            log.info(
                "%s unit %d (%s) attempt %d: %s written in %.1fs",
                self.stage.stage,
                unit,
                stats.get("split", ""),
                attempt,
                stats.get("written", 0),
                seconds,
            )
        except (StorageError, TransientUnitError) as error:
            # The store or a host, not the unit: hand the unit back and wait it out (within patience).
            log.warning("%s unit %d attempt %d: %s; released", self.stage.stage, unit, attempt, error)
            lease.close("released", str(error))
            self._wait_for_store(error)
        except Exception as error:
            message = f"{type(error).__name__}: {error}"
            log.exception("%s unit %d attempt %d failed", self.stage.stage, unit, attempt)
            metrics.UNITS.labels(self.stage.stage, "failed").inc()
            self.progress.failed[str(unit)] = message[:500]
            lease.close("failed", message)
        finally:
            self.current = None
            self.progress.busy_seconds += time.perf_counter() - started
            self.progress.save()

    def _wait_for_store(self, error: Exception) -> None:
        now = time.monotonic()
        self.store_trouble_since = self.store_trouble_since or now
        if now - self.store_trouble_since > store_patience():
            raise error
        time.sleep(min(15.0, 0.5 * 2 ** min(self.store_retries, 5)))
        self.store_retries += 1

    def _fresh_claims(self) -> None:
        """Attempt 0 of unclaimed units: own range first, then stolen runs from a fresh listing each
        time a claim is refused (someone is there) or the run is spent."""
        candidates = self.own_range()  # may be empty: more workers than units
        while True:
            for unit in candidates:
                lease = self._claim(unit, 0)
                if lease is None:
                    break
                self._run(lease)
            candidates = longest_run_upper_half(_patiently(Board.read, self.storage, self.total).unclaimed())
            if not candidates:
                return

    def _takeovers(self) -> list[int]:
        """Take over expired, failed or released claims, waiting while other workers' leases live;
        returns the units given up once every unit is settled."""
        while True:
            board = _patiently(Board.read, self.storage, self.total)
            if board.unclaimed():
                self._fresh_claims()
                continue
            given_up: list[int] = []
            next_expiry: float | None = None
            awaited: list[int] = []
            took_over = False
            for unit in board.open_claims():
                attempts = board.attempts[unit]
                claims = [read_claim(self.storage, unit, attempt) for attempt in attempts]
                latest = claims[-1]
                if sum(claim.get("state") == "failed" for claim in claims) >= MAX_FAILED_ATTEMPTS:
                    given_up.append(unit)
                    continue
                expired = bool(latest) and float(latest.get("expires") or 0) < time.time()
                if latest.get("state") not in ("failed", "released") and not expired:
                    expires = float(latest.get("expires") or time.time() + self.lease_seconds)
                    next_expiry = expires if next_expiry is None else min(next_expiry, expires)
                    awaited.append(unit)
                    continue
                lease = self._claim(unit, attempts[-1] + 1)
                if lease is not None:
                    log.info("unit %d: taking over attempt %d (%s)", unit, attempts[-1], latest.get("state"))
                    self._run(lease)
                    took_over = True
                    break  # the board is stale now
            if took_over:
                continue
            if next_expiry is None:
                return given_up
            self._await(awaited, next_expiry)

    def _await(self, awaited: list[int], next_expiry: float) -> None:
        """Wait while other workers hold the last units: until one of them is published (a marker
        HEAD each, backing off from 0.5 s to a quarter lease) or the first lease may have run out."""
        delay = 0.5
        while time.time() < next_expiry:
            time.sleep(max(0.05, min(delay, next_expiry - time.time() + 0.1)))
            delay = min(delay * 2, self.lease_seconds / 4)
            if any(_patiently(units.is_done, self.storage, unit) for unit in awaited):
                return

    def run(self) -> dict[str, Any]:
        """Work until every unit is settled; raises UnitsGivenUp when some failed on every attempt."""
        self.progress.save()
        previous = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            self._fresh_claims()
            given_up = self._takeovers()
            self.progress.state = "failed" if given_up else "done"
            self.progress.save()
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, previous)
        report = self.report()
        if given_up:
            errors = {u: self.progress.failed.get(str(u), "see its claims") for u in given_up}
            listing = "; ".join(f"unit {u}: {e}" for u, e in sorted(errors.items())[:20])
            raise UnitsGivenUp(
                f"{self.stage.stage}: {len(given_up)} of {self.total} units failed {MAX_FAILED_ATTEMPTS} "
                f"times and were given up ({listing}); fix the cause and rerun to retry only those"
            )
        return report

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # Scaled down or evicted: hand the unit in hand back at once instead of letting its lease run out.
        if self.current is not None:
            self.current.close("released")
        self.progress.state = "stopped"
        self.progress.save()
        raise SystemExit(128 + signum)

    def report(self) -> dict[str, Any]:
        return {
            "worker": self.identity.name,
            "units": len(self.progress.published),
            "written": self.progress.written,
            "modelLoads": self.progress.model_loads,
            "lost": self.progress.lost,
        }


# --- what every worker did, in O(workers) reads -------------------------------------------------


PROGRESS_READERS = 16  # the W small GETs of a reconcile run side by side: their latency, not their bytes


def read_progress(storage: Storage) -> list[dict[str, Any]]:
    from concurrent.futures import ThreadPoolExecutor

    def read(key: str) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = json.loads(storage.read_text(key))
        except (FileNotFoundError, ValueError):
            return None  # being rewritten
        return doc

    keys = [key for key in storage.list(WORKERS) if key.endswith(".json")]
    if len(keys) <= 1:
        return [doc for doc in map(read, keys) if doc is not None]
    with ThreadPoolExecutor(min(PROGRESS_READERS, len(keys))) as pool:
        return [doc for doc in pool.map(read, keys) if doc is not None]


def progress_totals(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Units published (each once: only its marker's creator counts it), samples written, workers and
    model loads, the failed units' errors, and the live rate over the workers' wall time."""
    published = {u for doc in docs for u in doc.get("units") or []}
    written = sum(int(doc.get("written") or 0) for doc in docs)
    started = min((float(doc.get("started") or 0) for doc in docs), default=0.0)
    updated = max((float(doc.get("updated") or 0) for doc in docs), default=0.0)
    failed: dict[str, str] = {}
    for doc in docs:
        failed.update(doc.get("failed") or {})
    for unit in published:
        failed.pop(str(unit), None)
    return {
        "unitsDone": len(published),
        "written": written,
        "workers": len(docs),
        "modelLoads": sum(int(doc.get("modelLoads") or 0) for doc in docs),
        "failedUnits": dict(sorted(failed.items(), key=lambda kv: int(kv[0]))),
        "imagesPerSecond": round(written / (updated - started), 2) if updated > started else 0.0,
    }


def reset_given_up(storage: Storage, total: int) -> int:
    """Forget the claims of units given up after failing, so a rerun retries them (and only them)."""
    board = Board.read(storage, total)
    reset = 0
    for unit in board.open_claims():
        states = [read_claim(storage, unit, a).get("state") for a in board.attempts[unit]]
        if states and all(state == "failed" for state in states) and len(states) >= MAX_FAILED_ATTEMPTS:
            storage.delete_prefix(f"{CLAIMS}/{unit:06d}")
            reset += 1
    return reset


# --- a pod: one worker per GPU ------------------------------------------------------------------


def visible_devices(count: int) -> list[str]:
    """The pod's devices, one per replica: $CUDA_VISIBLE_DEVICES (as the device plugin sets it) or
    0..count-1; a pod without GPUs runs one replica on the CPU."""
    listed = [d for d in (os.environ.get("CUDA_VISIBLE_DEVICES") or "").split(",") if d.strip()]
    if count <= 1:
        return listed[:1] or [""]
    devices = listed or [str(i) for i in range(count)]
    if len(devices) < count:
        raise RuntimeError(
            f"gpusPerPod is {count} but only {len(devices)} devices are visible ({','.join(devices)})"
        )
    return devices[:count]


def run_replicas(
    make_stage: Callable[[], StageWorker], identity: Identity, devices: list[str]
) -> list[dict[str, Any]]:
    """One worker per device: in this process for one, else in a spawned process each, pinned to its
    device through CUDA_VISIBLE_DEVICES before anything touches CUDA."""
    if len(devices) == 1:
        one = Identity(identity.index, identity.count, 0, devices[0])
        return [Worker(make_stage(), one).run()]
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        results = manager.dict()
        processes = [
            context.Process(
                target=_replica_main,
                args=(make_stage, Identity(identity.index, identity.count, r, device), results),
                name=f"replica-{r}",
            )
            for r, device in enumerate(devices)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        failed = [p.name for p in processes if p.exitcode]
        collected = [results[r] for r in sorted(results.keys())]
    if failed:
        raise UnitsGivenUp(f"replicas {failed} ended with errors; see their logs")
    return collected


def _replica_main(make_stage: Callable[[], StageWorker], identity: Identity, results: Any) -> None:
    if identity.device:
        os.environ["CUDA_VISIBLE_DEVICES"] = identity.device
    results[identity.replica] = Worker(make_stage(), identity).run()


def worker_index() -> int:
    """This pod's index in the Indexed Job (0 outside one)."""
    return int(os.environ.get("JOB_COMPLETION_INDEX") or 0)


def scratch_root() -> Path:
    import tempfile

    return Path(tempfile.gettempdir())
