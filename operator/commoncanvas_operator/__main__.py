"""``python -m commoncanvas_operator [kopf run options]``: kopf running this operator's handlers.

Options pass through to ``kopf run``: ``--namespace NS`` or ``--all-namespaces``, ``--liveness URL``,
``--peering NAME`` or ``--standalone``, ``--priority N``, ``--verbose``.

With ``--peering`` and no ``--priority``, each replica draws a random priority: kopf lets only the
highest-priority live peer work (replicas of equal priority would all work, with a warning), so
replicas of one Deployment, which share their arguments, need distinct ones.
"""

from __future__ import annotations

import random
import sys

from kopf.cli import main


def kopf_argv(options: list[str]) -> list[str]:
    argv = ["run", "--module", "commoncanvas_operator.handlers", *options]
    peering = any(o == "--peering" or o.startswith("--peering=") for o in options)
    if peering and not any(o == "--priority" or o.startswith("--priority=") for o in options):
        argv.append(f"--priority={random.SystemRandom().randint(1, 2**31 - 1)}")
    return argv


def run() -> None:
    sys.argv = [sys.argv[0], *kopf_argv(sys.argv[1:])]
    main()


if __name__ == "__main__":
    run()
