"""Pieces every custom resource shares: metadata, status conditions, phases, YAML loading."""

from __future__ import annotations

import codecs
import json
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

GROUP = "commoncanvas.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
# The custom resources' plural names (CRDs, API paths, kopf handlers: one place).
PLURALS = {
    "ScrapeJob": "scrapejobs",
    "CaptionJob": "captionjobs",
    "TrainRun": "trainruns",
    "EvalRun": "evalruns",
}
# The node pool GPU work runs on unless a spec names another (the chart defines it).
DEFAULT_NODE_POOL = "a100"
# Fields every kind has on a cluster, described once.
StageSuspend = Annotated[
    bool,
    Field(
        description="Pause (on a cluster): the worker pods stop, their units are released and taken "
        "over on resume; nothing is lost"
    ),
]
PriorityClassName = Annotated[
    str | None,
    Field(
        max_length=253,
        description="PriorityClass of the resource's pods (on a cluster); default: the node pool's "
        "(chart nodePools.<pool>.priorityClassName)",
    ),
]


class KubeModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are an error locally (the API
    server prunes them, so a typo must fail here rather than be silently ignored)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class ObjectMeta(KubeModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    namespace: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class GpuWorkerPods(KubeModel):
    """The worker-pod fields of a GPU stage (CaptionJob, EvalRun), declared once."""

    parallelism: int = Field(1, ge=1, le=10_000, description="Worker pods (not units); changes in place")
    suspend: StageSuspend = False
    priority_class_name: PriorityClassName = None
    gpus_per_pod: int = Field(1, ge=0, le=16, description="GPUs per worker pod: one model copy per GPU")
    node_pool: str = Field(DEFAULT_NODE_POOL, description="Node pool from the chart's values to run on")


class Phase(StrEnum):
    PENDING = "Pending"
    WAITING = "Waiting"
    QUEUED = "Queued"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class Condition(KubeModel):
    type: str
    status: str = Field(description="True, False or Unknown")
    reason: str = ""
    message: str = ""
    last_transition_time: str = ""
    observed_generation: int = Field(0, description="The resource generation this condition was set from")


class UnitCounts(KubeModel):
    total: int = 0
    succeeded: int = 0
    failed: int = 0


class CommonStatus(KubeModel):
    phase: Phase = Phase.PENDING
    conditions: list[Condition] = Field(default_factory=list)
    units: UnitCounts = Field(default_factory=UnitCounts)
    progress: str = Field("", description="units succeeded/total, for kubectl get")
    workers: int = Field(0, description="Worker processes that ran (pods x GPUs), not units")
    model_loads: int = Field(0, description="Models loaded by the workers: one per worker, not per unit")
    start_time: str = ""
    completion_time: str = ""
    observed_generation: int = 0


class SpecError(ValueError):
    """A resource file that does not validate; the message names the file, document and field."""


class PlanMismatch(SpecError):
    """An output already holds a plan made from other inputs or settings: the message names the output
    and says to use a new output URI (the finished units there would not match)."""


# A resource file is a few resources, not a data set; the API server caps an object near 1.5 MiB.
MAX_FILE_BYTES = 8 * 1024 * 1024


class _Refused(yaml.MarkedYAMLError):
    """YAML that parses but that a resource file may not hold; `hint` says what to write instead."""

    def __init__(self, problem: str, mark: yaml.Mark, hint: str) -> None:
        super().__init__(problem=problem, problem_mark=mark)
        self.hint = hint


class ResourceLoader(yaml.SafeLoader):
    """SafeLoader for resource files: what it builds is JSON (what the API server would store).

    Aliases are refused (a manifest never needs one, and refusing them is what makes a billion-laughs
    file fail at its first alias, in bounded memory); so are duplicate keys (the later would silently
    win), and tags beyond JSON's types (!!binary, !!set, !!omap, !!pairs). Timestamps stay strings, as
    kubectl keeps them."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(
                f"YAML alias *{event.anchor} is not accepted in a resource file",
                event.start_mark,
                "write the value out instead of referring to an anchor",
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[tuple[str, str], yaml.Node] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode):
                first = seen.setdefault((key.tag, key.value), key)
                if first is not key:
                    raise _Refused(
                        f"duplicate key {key.value!r} (first at line {first.start_mark.line + 1})",
                        key.start_mark,
                        "keep one of them",
                    )
        return super().construct_mapping(node, deep=deep)

    def _timestamp_as_str(self, node: yaml.Node) -> str:
        return str(self.construct_scalar(node))  # type: ignore[arg-type]

    def _refuse_tag(self, node: yaml.Node) -> Any:
        raise _Refused(
            f"the tag {node.tag} is not accepted in a resource file",
            node.start_mark,
            "use a string, number, boolean, null, list or mapping",
        )


ResourceLoader.add_constructor("tag:yaml.org,2002:timestamp", ResourceLoader._timestamp_as_str)
for _tag in ("binary", "set", "omap", "pairs"):
    ResourceLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", ResourceLoader._refuse_tag)


def _yaml_error(path: Path, exc: yaml.YAMLError, text: str) -> SpecError:
    """One line naming the file, line and column of a YAML problem."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        if isinstance(exc, _Refused):
            return SpecError(f"{where}: {exc.problem}; {exc.hint}")
        problem = exc.problem or exc.context or "cannot be parsed"
        if exc.context and exc.problem and exc.context_mark:
            problem = f"{problem} ({exc.context} at line {exc.context_mark.line + 1})"
        return SpecError(f"{where}: invalid YAML: {problem}; fix the syntax")
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        return SpecError(
            f"{path}:{line}: invalid YAML: the control character #x{exc.character:04x} is not allowed in "
            "YAML; remove it"
        )
    return SpecError(f"{path}: invalid YAML: {' '.join(str(exc).split())}; fix the syntax")


def read_documents(path: str | Path) -> list[tuple[yaml.Node, Any]]:
    """Every non-empty document of a YAML file, as (node, value): the node has the lines, the value is
    plain JSON. Anything wrong with the file raises SpecError with one line naming the file and line."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise SpecError(
            f"{path} is {size} bytes; a resource file holds at most {MAX_FILE_BYTES // 2**20} MiB of "
            "resources, so split it or check that it is the right file"
        )
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        start = bom + exc.start
        line = data.count(b"\n", 0, start) + 1
        raise SpecError(
            f"{path}:{line}: byte {start} (0x{data[start]:02x}) is not UTF-8; save the file as UTF-8"
        ) from None
    documents: list[tuple[yaml.Node, Any]] = []
    loader: ResourceLoader | None = None
    try:
        loader = ResourceLoader(text)
        while loader.check_node():
            node = loader.get_node()
            value = loader.construct_document(node) if node is not None else None
            if node is not None and value is not None:
                documents.append((node, value))
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc, text) from None
    except RecursionError:
        raise SpecError(f"{path}: invalid YAML: nested too deeply; a resource is a few levels deep") from None
    finally:
        if loader is not None:
            loader.dispose()
    return documents


def line_of(node: yaml.Node, loc: tuple[int | str, ...]) -> int:
    """The line (from 1) of the field at `loc` (a pydantic error location), or of its nearest parent that
    is there (a missing field is reported at its parent)."""
    line: int = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    line, node = key.start_mark.line + 1, value
                    break
            else:
                break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _got(error: Any) -> str:
    """What the field held, for the scalar inputs whose type or range is wrong."""
    value = error.get("input")
    if error["type"] == "missing" or isinstance(value, dict | list):
        return ""
    if isinstance(value, str):
        return f" (got {value!r})" if len(value) <= 60 else ""
    return f" (got {json.dumps(value)})"


def format_validation_error(
    exc: ValidationError,
    where: str,
    source: str | Path | None = None,
    node: yaml.Node | None = None,
) -> str:
    """One line for one problem (`FILE:LINE: ...` when the file and its node are known); several
    problems are listed one per line under a header, each with its line."""
    errors = exc.errors(include_url=False)

    def problem(error: Any) -> str:
        field = ".".join(str(p) for p in error["loc"]) or "(top level)"
        return f"{field}: {error['msg']}{_got(error)}"

    if len(errors) == 1:
        at = ""
        if source is not None:
            at = f"{source}:{line_of(node, errors[0]['loc'])}: " if node is not None else f"{source}: "
        return f"{at}{where} is not a valid resource: {problem(errors[0])}"
    header = f"{source}: {where}" if source is not None else where
    lines = [f"{header} is not a valid resource ({len(errors)} problems):"]
    for error in errors:
        line = f" (line {line_of(node, error['loc'])})" if node is not None else ""
        lines.append(f"  {problem(error)}{line}")
    return "\n".join(lines)


def load_resources(path: str | Path, kinds: Mapping[str, type[BaseModel]]) -> list[Any]:
    """Every document of a YAML file, each validated by the model its `kind` names, strictly (as the API
    server reads JSON: `concurrency: true` or `"5"` for a number is an error, `1` for a float is not).
    Two resources of one kind and name in a file are an error too."""
    path = Path(path)
    resources: list[Any] = []
    first_line: dict[tuple[str, str], int] = {}
    for number, (node, doc) in enumerate(read_documents(path), start=1):
        line = node.start_mark.line + 1
        if not isinstance(doc, dict):
            raise SpecError(
                f"{path}:{line}: document {number} is a {type(doc).__name__}, not a mapping; each "
                "document is one resource with apiVersion, kind, metadata and spec"
            )
        kind = doc.get("kind")
        if not isinstance(kind, str) or kind not in kinds:
            raise SpecError(
                f"{path}:{line_of(node, ('kind',))}: document {number}: kind {kind!r} is not one of "
                f"{sorted(kinds)}; fix the kind"
            )
        metadata = doc.get("metadata")
        name = metadata.get("name") if isinstance(metadata, dict) else None
        where = f"document {number} ({kind} {name!r})" if isinstance(name, str) else f"document {number}"
        try:
            resource: Any = kinds[kind].model_validate_json(json.dumps(doc), strict=True)
        except ValidationError as exc:
            raise SpecError(format_validation_error(exc, where, path, node)) from None
        name_line = line_of(node, ("metadata", "name"))
        first = first_line.setdefault((kind, resource.metadata.name), name_line)
        if first != name_line:
            raise SpecError(
                f"{path}:{name_line}: {kind} {resource.metadata.name!r} is already defined at line {first} "
                "of this file; give each resource its own metadata.name"
            )
        resources.append(resource)
    return resources
