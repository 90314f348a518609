"""`python -m commoncanvas.train FILE.yaml [--name NAME]`: one training process of a TrainRun.

torchrun starts one per GPU (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
TORCHELASTIC_RESTART_COUNT); started alone it is the whole run.  Other environment: METRICS_PORT
(Prometheus on METRICS_PORT + LOCAL_RANK; unset = none), S3_ENDPOINT_URL and AWS_* for s3:// URIs,
COMMONCANVAS_MODEL_CACHE and COMMONCANVAS_DATA_CACHE for downloads, HF_HUB_OFFLINE.

`dataset.captionJobRef` resolves to the output of the CaptionJob of that name in the same FILE, or to
`--caption-job NAME=URI`.  Exit status: 0 when the run finished (pipeline and data card written), 143
after a SIGTERM stopped it at a checkpoint, 1 on an error (a person's error prints as one message).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from commoncanvas.specs import KINDS, CaptionJob, TrainRun, load_resources
from commoncanvas.specs.common import SpecError


def pick_run(resources: list[object], name: str | None, file: Path) -> TrainRun:
    runs = [r for r in resources if isinstance(r, TrainRun)]
    if name is not None:
        runs = [r for r in runs if r.metadata.name == name]
    if len(runs) != 1:
        which = f"named {name!r} " if name else ""
        raise SpecError(
            f"{file} must hold exactly one TrainRun {which}(found {len(runs)}); pick one with --name"
        )
    return runs[0]


def caption_outputs(resources: list[object], pairs: list[str]) -> dict[str, str]:
    """CaptionJob name -> output URI: the file's CaptionJobs, then --caption-job NAME=URI overrides."""
    outputs = {r.metadata.name: r.spec.output.uri for r in resources if isinstance(r, CaptionJob)}
    for pair in pairs:
        name, sep, uri = pair.partition("=")
        if not sep or not name or not uri:
            raise SpecError(f"--caption-job {pair!r}: expected NAME=URI")
        outputs[name] = uri
    return outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m commoncanvas.train", description=__doc__.split("\n")[0])
    parser.add_argument("file", type=Path, help="YAML file holding the TrainRun")
    parser.add_argument("--name", help="which TrainRun of the file (needed if it holds several)")
    parser.add_argument(
        "--caption-job",
        action="append",
        default=[],
        metavar="NAME=URI",
        help="where CaptionJob NAME's output is",
    )
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
    )
    from commoncanvas.caption.unitplan import InputMissing
    from commoncanvas.runner import References
    from commoncanvas.storage import StorageError
    from commoncanvas.train.datacard import LicenseViolation
    from commoncanvas.train.loop import TERMINATED_EXIT_CODE, TrainingDiverged, run_training

    try:
        resources = load_resources(args.file, KINDS)
        run = pick_run(resources, args.name, args.file)
        resolve = References(
            "CaptionJob", f"TrainRun {run.metadata.name!r}", caption_outputs(resources, args.caption_job)
        )
        summary = run_training(run, resolve)
    except (SpecError, InputMissing, StorageError, LicenseViolation, LookupError, TrainingDiverged) as exc:
        logging.getLogger("commoncanvas.train").error("%s", exc)
        return 1
    if rank == "0":
        print(json.dumps(summary), flush=True)
    return TERMINATED_EXIT_CODE if summary.get("stopped") == "terminated" else 0


if __name__ == "__main__":
    sys.exit(main())
