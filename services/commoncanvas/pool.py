"""Local workers: the same workqueue loop a stage's pods run, as W processes on this machine.

Below both the local runner and the latents phase (neither imports the other). The parent starts the
processes, draws progress from their progress objects (O(workers) reads, as the operator does), and
reports units given up; a worker ends when the runner is gone, so killing the runner stops its workers.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from commoncanvas import units, workqueue
from commoncanvas.storage import Storage, StorageError

console = Console(stderr=True)
# Light modules only: a model stage's workers import torch themselves, once per worker process.
WORKER_MODULES = ["commoncanvas.scrape.worker"]


class UnitsFailed(RuntimeError):
    """Some units failed on every attempt; the others finished and kept their markers, so a rerun does
    only these."""


def local_processes(parallelism: int) -> int:
    return max(1, min(parallelism, os.cpu_count() or 1))


def worker_context() -> multiprocessing.context.ForkServerContext:
    """Fork workers from a clean server that imported the scrape worker once: no inherited boto3
    clients or event loops, and no import cost per worker."""
    context = multiprocessing.get_context("forkserver")
    assert isinstance(context, multiprocessing.context.ForkServerContext)
    context.set_forkserver_preload(WORKER_MODULES)
    return context


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie is dead: its parent has not reaped it yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _follow_runner(runner: int) -> None:
    """End this worker (SIGTERM: it hands its unit back) once the runner is gone. A forkserver child
    cannot rely on PR_SET_PDEATHSIG: its parent is the forkserver, which outlives the runner while any
    of its children holds the forkserver's keep-alive pipe, as every worker does."""
    while _alive(runner):
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)


def _worker_main(
    make_stage: Callable[[], workqueue.StageWorker],
    identity: workqueue.Identity,
    errors: Any,
    environment: dict[str, str],
    runner: int,
) -> None:
    # The forkserver was started with the environment of the runner's first stage: use today's.
    os.environ.clear()
    os.environ.update(environment)
    threading.Thread(target=_follow_runner, args=(runner,), name="follow-runner", daemon=True).start()
    import logging

    logging.basicConfig(level=logging.WARNING)
    try:
        workqueue.Worker(make_stage(), identity).run()
    except workqueue.UnitsGivenUp:
        raise SystemExit(3) from None
    except Exception as error:  # the parent names it: the worker's own traceback is in its log
        errors.put(f"worker {identity.index}: {type(error).__name__}: {error}")
        raise


def run_workers(
    label: str,
    output: Storage,
    total: int,
    make_stage: Callable[[], workqueue.StageWorker],
    processes: int,
    show_progress: bool,
) -> dict[str, Any]:
    """Run `processes` workers over a stage's `total` units until every unit is settled; raise
    UnitsFailed naming the units given up. Returns the workers' progress totals."""
    if workqueue.reset_given_up(output, total):
        console.print(f"[bold]{label}[/]: retrying units that failed in an earlier run")
    columns = (
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("units  {task.fields[samples]} samples  {task.fields[workers]} workers"),
        TimeElapsedColumn(),
    )
    count = max(1, min(processes, total)) if total else 0
    context = worker_context()
    errors = context.SimpleQueue()
    workers = [
        context.Process(
            target=_worker_main,
            args=(make_stage, workqueue.Identity(index, count), errors, dict(os.environ), os.getpid()),
            name=f"{label} worker {index}",
        )
        for index in range(count)
    ]
    with Progress(*columns, console=console, disable=not show_progress) as progress:
        task = progress.add_task("units", total=total, samples=0, workers=count)
        try:
            for worker in workers:
                worker.start()
            while any(worker.is_alive() for worker in workers):
                time.sleep(0.5)
                if show_progress:
                    _show(progress, task, output, total)
        finally:
            for worker in workers:
                if worker.is_alive():
                    worker.terminate()
                worker.join()
        _show(progress, task, output, total)
    failed: list[str] = []
    while not errors.empty():
        failed.append(f"  {errors.get()}")
    try:
        totals = workqueue.progress_totals(workqueue.read_progress(output))
        missing = str(total - len(units.done_units(output)))
    except StorageError as error:  # the store is away: the workers gave up for the same reason
        totals, missing = workqueue.progress_totals([]), "some"
        failed.append(f"  reading their progress: {error}")
    if missing != "0":
        failed[:0] = [f"  unit {u}: {e}" for u, e in list(totals["failedUnits"].items())[:50]]
        raise UnitsFailed(
            f"{label}: {missing} of {total} units did not finish; rerun to retry only those:\n"
            + "\n".join(failed)
        )
    return totals


def _show(progress: Progress, task: Any, output: Storage, total: int) -> None:
    try:
        totals = workqueue.progress_totals(workqueue.read_progress(output))
    except StorageError:
        return  # shown again on the next poll
    progress.update(task, completed=totals["unitsDone"], samples=totals["written"])
