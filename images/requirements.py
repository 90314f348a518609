"""Print the pinned requirements of pyproject.toml for one image, one per line.

pyproject.toml is the one place that pins dependencies; each image installs a subset of them:
  python images/requirements.py [--extra NAME]... [--skip "NAME NAME ..."] pyproject.toml
Names compare after PEP 503 normalisation, so "Huggingface_Hub" skips "huggingface-hub>=0.34".
Runs on the image's bare Python (3.11+): standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return normalize(match.group(1))


def requirements(pyproject: Path, extras: list[str], skip: set[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project["dependencies"])
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise KeyError(f"pyproject.toml has no extra {extra!r} (has: {', '.join(sorted(optional))})")
        lines += optional[extra]
    skip = {normalize(name) for name in skip}
    unknown = skip - {requirement_name(line) for line in lines}
    if unknown:
        # A stale skip list would silently install what it meant to leave out after a rename.
        raise KeyError(f"--skip names no requirement: {', '.join(sorted(unknown))}")
    return [line for line in lines if requirement_name(line) not in skip]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--extra", action="append", default=[], help="Add an optional-dependencies group")
    parser.add_argument("--skip", default="", help="Whitespace-separated distribution names to leave out")
    args = parser.parse_args(argv)
    for line in requirements(args.pyproject, args.extra, set(args.skip.split())):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
