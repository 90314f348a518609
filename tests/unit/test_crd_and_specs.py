"""The ScrapeJob CRD generated from the pydantic models, and validation of ScrapeJob YAML."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from commoncanvas.crd import KIND_INFO, build_crd, crd_filename, render_crd, write_crds
from commoncanvas.licenses import DEFAULT_ALLOWED
from commoncanvas.specs import GROUP, KINDS, VERSION, ScrapeJob, load_resources
from commoncanvas.specs.common import SpecError

REPO = Path(__file__).resolve().parents[2]


# --- the checked-in file ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KIND_INFO))
def test_checked_in_crds_equal_the_generated_ones(kind: str) -> None:
    checked_in = REPO / "manifests" / "crds" / crd_filename(kind)
    assert checked_in.read_text() == render_crd(kind), (
        f"{checked_in.relative_to(REPO)} is out of date with the spec models; run `commoncanvas crds`"
    )


def test_write_crds_writes_one_file_per_kind_named_plural_dot_group(tmp_path: Path) -> None:
    written = write_crds(tmp_path / "crds")
    assert [p.name for p in written] == [crd_filename(k) for k in KIND_INFO]
    assert "scrapejobs.commoncanvas.dev.yaml" in [p.name for p in written]
    for path, kind in zip(written, KIND_INFO, strict=True):
        assert yaml.safe_load(path.read_text()) == build_crd(kind)


@pytest.mark.parametrize("kind", sorted(KIND_INFO))
def test_every_crd_is_structural(kind: str) -> None:
    root = yaml.safe_load(render_crd(kind))["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    forbidden = {"$ref", "anyOf", "oneOf", "allOf", "not", "$defs", "definitions"}
    assert not forbidden & set(all_keys(root))
    untyped = [path for path, node in schema_nodes(root) if "type" not in node]
    assert not untyped, f"{kind}: schema nodes without a type: {untyped}"


# --- the CRD's shape --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(render_crd("ScrapeJob"))


@pytest.fixture(scope="module")
def version(crd: dict[str, Any]) -> dict[str, Any]:
    [only] = crd["spec"]["versions"]
    return only


@pytest.fixture(scope="module")
def schema(version: dict[str, Any]) -> dict[str, Any]:
    return version["schema"]["openAPIV3Schema"]


def schema_nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema in the tree: the node, its properties, items and additionalProperties schemas."""
    yield path or "(root)", node
    for name, child in node.get("properties", {}).items():
        yield from schema_nodes(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from schema_nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from schema_nodes(node["additionalProperties"], f"{path}{{}}")


def all_keys(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from all_keys(value)
    elif isinstance(node, list):
        for item in node:
            yield from all_keys(item)


def test_crd_names_group_and_version(crd: dict[str, Any], version: dict[str, Any]) -> None:
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == f"scrapejobs.{GROUP}"
    assert crd["spec"]["group"] == GROUP == "commoncanvas.dev"
    assert crd["spec"]["scope"] == "Namespaced"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["singular"]) == ("ScrapeJob", "scrapejobs", "scrapejob")
    assert names["shortNames"] == ["sj"]
    assert (version["name"], version["served"], version["storage"]) == (VERSION, True, True)
    assert VERSION == "v1alpha1"


def test_crd_has_the_status_subresource(version: dict[str, Any]) -> None:
    assert version["subresources"] == {"status": {}}


def test_kubectl_get_shows_phase_progress_and_age(version: dict[str, Any]) -> None:
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert columns["Phase"]["jsonPath"] == ".status.phase"
    assert columns["Progress"]["jsonPath"] == ".status.progress"
    assert (columns["Age"]["jsonPath"], columns["Age"]["type"]) == (".metadata.creationTimestamp", "date")
    assert all({"name", "type", "jsonPath"} <= set(c) for c in columns.values())


def test_printer_columns_point_at_fields_the_status_schema_has(
    version: dict[str, Any], schema: dict[str, Any]
) -> None:
    status = schema["properties"]["status"]["properties"]
    for column in version["additionalPrinterColumns"]:
        path = column["jsonPath"].split(".")
        if path[1] == "status":
            assert path[2] in status, column


def test_schema_uses_no_references_or_combinators(schema: dict[str, Any]) -> None:
    forbidden = {"$ref", "$defs", "definitions", "anyOf", "oneOf", "allOf", "not"}
    assert not forbidden & set(all_keys(schema))


def test_every_schema_node_has_a_type(schema: dict[str, Any]) -> None:
    untyped = [path for path, node in schema_nodes(schema) if "type" not in node]
    assert untyped == []


def test_no_schema_node_has_both_properties_and_additional_properties(schema: dict[str, Any]) -> None:
    both = [
        path for path, node in schema_nodes(schema) if "properties" in node and "additionalProperties" in node
    ]
    assert both == []
    assert not [path for path, node in schema_nodes(schema) if node.get("additionalProperties") is False]


def test_metadata_is_left_to_the_api_server_and_spec_is_required(schema: dict[str, Any]) -> None:
    props = schema["properties"]
    assert props["metadata"] == {"type": "object"}
    assert props["apiVersion"] == props["kind"] == {"type": "string"}
    assert schema["required"] == ["spec"]
    assert set(props["spec"]["required"]) == {"source", "output"}


def test_schema_is_camel_case_like_the_yaml(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]["properties"]
    assert {"unitSize", "parallelism", "fetch", "filters", "licenses"} <= set(spec)
    assert "originalUrlTemplate" in spec["fetch"]["properties"]
    assert "unit_size" not in spec


def test_schema_lets_only_licenses_that_allow_derivatives_be_named(schema: dict[str, Any]) -> None:
    allow = schema["properties"]["spec"]["properties"]["licenses"]["properties"]["allow"]
    assert sorted(allow["items"]["enum"]) == sorted(DEFAULT_ALLOWED)
    assert not {"cc-by-nd", "cc-by-nc-nd", "all-rights-reserved"} & set(allow["items"]["enum"])


def test_schema_carries_the_models_bounds(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]["properties"]
    assert spec["parallelism"]["minimum"] == 1
    assert (spec["unitSize"]["minimum"], spec["unitSize"]["default"]) == (1, 10_000)
    timeout = spec["fetch"]["properties"]["timeoutSeconds"]
    assert (timeout["minimum"], timeout["exclusiveMinimum"]) == (0, True)  # OpenAPI 3.0 form


def test_status_phase_is_an_enum_of_the_documented_phases(schema: dict[str, Any]) -> None:
    phase = schema["properties"]["status"]["properties"]["phase"]
    assert phase["type"] == "string"
    assert set(phase["enum"]) == {
        "Pending",
        "Waiting",
        "Queued",
        "Running",
        "Succeeded",
        "Failed",
        "Suspended",
    }


# --- validating ScrapeJob YAML ----------------------------------------------------------------------

VALID = """\
apiVersion: commoncanvas.dev/v1alpha1
kind: ScrapeJob
metadata:
  name: yfcc-cc
spec:
  source:
    uri: s3://datasets/yfcc100m_dataset.bz2
  output:
    uri: s3://commoncanvas/catalog
  unitSize: 500
  parallelism: 8
  licenses:
    allow: [cc-by, cc-by-nc]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scrapejob.yaml"
    path.write_text(text)
    return path


def spec_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(SpecError) as caught:
        load_resources(write(tmp_path, text), KINDS)
    return str(caught.value)


def test_valid_scrapejob_loads_with_camel_case_fields_and_defaults(tmp_path: Path) -> None:
    [job] = load_resources(write(tmp_path, VALID), KINDS)
    assert isinstance(job, ScrapeJob)
    assert (job.metadata.name, job.spec.unit_size, job.spec.parallelism) == ("yfcc-cc", 500, 8)
    assert job.spec.licenses.allow == ["cc-by", "cc-by-nc"]
    assert job.spec.fetch.use_download_url is True and job.spec.filters.min_side == 256


def test_license_allow_list_defaults_to_every_license_allowing_derivatives(tmp_path: Path) -> None:
    text = VALID.replace("  licenses:\n    allow: [cc-by, cc-by-nc]\n", "")
    [job] = load_resources(write(tmp_path, text), KINDS)
    assert job.spec.licenses.allow == list(DEFAULT_ALLOWED)


@pytest.mark.parametrize("code", ["cc-by-nd", "cc-by-nc-nd", "all-rights-reserved"])
def test_noderivs_or_all_rights_reserved_license_is_rejected_naming_the_field(
    tmp_path: Path, code: str
) -> None:
    message = spec_error(tmp_path, VALID.replace("[cc-by, cc-by-nc]", f"[cc-by, {code}]"))
    assert "spec.licenses.allow.1" in message
    assert str(tmp_path / "scrapejob.yaml") in message and "document 1" in message


def test_negative_parallelism_is_rejected_naming_the_field(tmp_path: Path) -> None:
    message = spec_error(tmp_path, VALID.replace("parallelism: 8", "parallelism: -2"))
    assert "spec.parallelism" in message
    assert "greater than or equal to 1" in message


def test_missing_output_is_rejected_naming_the_field(tmp_path: Path) -> None:
    message = spec_error(tmp_path, VALID.replace("  output:\n    uri: s3://commoncanvas/catalog\n", ""))
    assert "spec.output" in message
    assert "Field required" in message


def test_misspelt_field_is_rejected_rather_than_ignored(tmp_path: Path) -> None:
    message = spec_error(tmp_path, VALID.replace("unitSize: 500", "unitsize: 500"))
    assert "spec.unitsize" in message


def test_every_problem_of_a_document_is_listed_one_per_line(tmp_path: Path) -> None:
    text = VALID.replace("parallelism: 8", "parallelism: 0").replace("unitSize: 500", "unitSize: 0")
    lines = spec_error(tmp_path, text).splitlines()
    assert any(line.strip().startswith("spec.parallelism:") for line in lines)
    assert any(line.strip().startswith("spec.unitSize:") for line in lines)


def test_unknown_kind_is_rejected_naming_the_kind(tmp_path: Path) -> None:
    message = spec_error(tmp_path, VALID.replace("kind: ScrapeJob", "kind: ScrapeJb"))
    assert "'ScrapeJb'" in message and "ScrapeJob" in message


def test_error_in_a_later_document_names_that_document(tmp_path: Path) -> None:
    second = VALID.replace("name: yfcc-cc", "name: second").replace("parallelism: 8", "parallelism: -1")
    message = spec_error(tmp_path, VALID + "---\n" + second)
    assert "document 2" in message and "spec.parallelism" in message


def test_invalid_resource_name_is_rejected(tmp_path: Path) -> None:
    message = spec_error(tmp_path, VALID.replace("name: yfcc-cc", "name: YFCC_CC"))
    assert "metadata.name" in message
