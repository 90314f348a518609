"""``python -m commoncanvas_operator [kopf run options]``: kopf running this operator's handlers.

Options pass through to ``kopf run``: ``--namespace NS`` or ``--all-namespaces``, ``--liveness URL``,
``--peering NAME`` or ``--standalone``, ``--verbose``.
"""

from __future__ import annotations

import sys

from kopf.cli import main


def run() -> None:
    sys.argv = [sys.argv[0], "run", "--module", "commoncanvas_operator.handlers", *sys.argv[1:]]
    main()


if __name__ == "__main__":
    run()
