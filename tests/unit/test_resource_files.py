"""A resource file is checked whole before anything runs, and whatever is wrong with it comes out of
`commoncanvas run FILE` as one line on stderr naming the file and line or the resource field."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from commoncanvas.runner import LocalRun
from commoncanvas.specs import KINDS, load_resources
from commoncanvas.specs.common import SpecError
from commoncanvas.storage import InvalidURI, check_uri, open_storage

REPO = Path(__file__).resolve().parents[2]


def scrape(name: str, tmp_path: Path, **fetch: str) -> str:
    lines = "".join(f"\n    {key}: {value}" for key, value in fetch.items())
    return f"""apiVersion: commoncanvas.dev/v1alpha1
kind: ScrapeJob
metadata:
  name: {name}
spec:
  source:
    uri: {tmp_path / "metadata.tsv"}
  output:
    uri: {tmp_path / name}
  unitSize: 10
  fetch:
    perHostRate: 1{lines}
"""


def caption(name: str, tmp_path: Path, scrape_ref: str) -> str:
    return f"""apiVersion: commoncanvas.dev/v1alpha1
kind: CaptionJob
metadata:
  name: {name}
spec:
  input:
    scrapeJobRef: {scrape_ref}
  output:
    uri: {tmp_path / name}
"""


def train(name: str, tmp_path: Path, dataset: str) -> str:
    return f"""apiVersion: commoncanvas.dev/v1alpha1
kind: TrainRun
metadata:
  name: {name}
spec:
  dataset:
{dataset}
  output:
    uri: {tmp_path / name}
  checkpoint:
    uri: {tmp_path / name / "checkpoints"}
  model:
    architecture: tiny
"""


def write(tmp_path: Path, *documents: str) -> Path:
    (tmp_path / "metadata.tsv").touch()
    path = tmp_path / "resources.yaml"
    path.write_text("---\n".join(documents))
    return path


def run_cli(*args: str, timeout: float = 60) -> str:
    """`python -m commoncanvas.cli ARGS`: it must fail with exactly one line on stderr, no traceback."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "services"), str(REPO / "operator")])}
    result = subprocess.run(
        [sys.executable, "-m", "commoncanvas.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0].removeprefix("Error: ")


def run_file_cli(path: Path, timeout: float = 60) -> str:
    return run_cli("run", "--no-progress", str(path), timeout=timeout)


# --- the YAML itself -------------------------------------------------------------------------------


def test_invalid_yaml_is_one_line_naming_the_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, scrape("photos", tmp_path).replace("unitSize: 10", "unitSize: [10"))
    message = run_file_cli(path)
    assert message.startswith(f"{path}:")
    assert "invalid YAML" in message and message.endswith("fix the syntax")
    line, column = message.removeprefix(f"{path}:").split(":")[:2]
    assert line.isdigit() and column.isdigit()


def test_a_tab_indented_line_is_named_by_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, scrape("photos", tmp_path).replace("  unitSize: 10", "\tunitSize: 10"))
    assert run_file_cli(path).startswith(f"{path}:10:1: invalid YAML: ")


def test_a_file_that_is_not_utf8_is_one_line_naming_the_line_and_byte(tmp_path: Path) -> None:
    path = write(tmp_path, scrape("photos", tmp_path))
    path.write_bytes(path.read_bytes().replace(b"name: photos", b"name: caf\xe9"))
    message = run_file_cli(path)
    assert message.startswith(f"{path}:4: byte ")
    assert "(0xe9) is not UTF-8; save the file as UTF-8" in message


def test_a_control_character_is_one_line_naming_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, scrape("photos", tmp_path).replace("name: photos", "name: pho\x01tos"))
    assert (
        run_file_cli(path)
        == f"{path}:4: invalid YAML: the control character #x0001 is not allowed in YAML; remove it"
    )


def test_a_file_with_no_resources_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n---\n")
    assert run_file_cli(path).startswith(f"{path} holds no resources")


BILLION_LAUGHS = """lol0: &lol0 "lol"
lol1: &lol1 [*lol0, *lol0, *lol0, *lol0, *lol0, *lol0, *lol0, *lol0, *lol0, *lol0]
lol2: &lol2 [*lol1, *lol1, *lol1, *lol1, *lol1, *lol1, *lol1, *lol1, *lol1, *lol1]
lol3: &lol3 [*lol2, *lol2, *lol2, *lol2, *lol2, *lol2, *lol2, *lol2, *lol2, *lol2]
lol4: &lol4 [*lol3, *lol3, *lol3, *lol3, *lol3, *lol3, *lol3, *lol3, *lol3, *lol3]
lol5: &lol5 [*lol4, *lol4, *lol4, *lol4, *lol4, *lol4, *lol4, *lol4, *lol4, *lol4]
lol6: &lol6 [*lol5, *lol5, *lol5, *lol5, *lol5, *lol5, *lol5, *lol5, *lol5, *lol5]
lol7: &lol7 [*lol6, *lol6, *lol6, *lol6, *lol6, *lol6, *lol6, *lol6, *lol6, *lol6]
lol8: &lol8 [*lol7, *lol7, *lol7, *lol7, *lol7, *lol7, *lol7, *lol7, *lol7, *lol7]
lol9: &lol9 [*lol8, *lol8, *lol8, *lol8, *lol8, *lol8, *lol8, *lol8, *lol8, *lol8]
apiVersion: commoncanvas.dev/v1alpha1
kind: ScrapeJob
metadata: {name: *lol9}
"""


def test_a_billion_laughs_file_is_refused_at_its_first_alias_quickly(tmp_path: Path) -> None:
    path = tmp_path / "laughs.yaml"
    path.write_text(BILLION_LAUGHS)
    started = time.monotonic()
    message = run_file_cli(path, timeout=30)
    assert time.monotonic() - started < 20
    assert message.startswith(f"{path}:2:14: YAML alias *lol0 is not accepted in a resource file")
    with pytest.raises(SpecError, match="alias"):
        load_resources(path, KINDS)


def test_a_document_that_is_not_a_mapping_is_named_by_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, scrape("photos", tmp_path), "- just\n- a list\n")
    message = run_file_cli(path)
    assert message.startswith(f"{path}:14: document 2 is a list, not a mapping")


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        scrape("photos", tmp_path, concurrency="4").replace("unitSize: 10", "unitSize: 10\n  unitSize: 20"),
    )
    message = run_file_cli(path)
    assert message.startswith(f"{path}:11:3: duplicate key 'unitSize' (first at line 10)")


# --- strict types ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["true", '"5"', "4.0"])
def test_a_non_integer_for_an_integer_field_is_refused_naming_the_field_and_line(
    tmp_path: Path, value: str
) -> None:
    path = write(tmp_path, scrape("photos", tmp_path, concurrency=value))
    message = run_file_cli(path)
    assert message.startswith(f"{path}:13: document 1 (ScrapeJob 'photos') is not a valid resource: ")
    assert "spec.fetch.concurrency: Input should be a valid integer" in message


def test_an_integer_for_a_float_field_is_accepted(tmp_path: Path) -> None:
    [job] = load_resources(write(tmp_path, scrape("photos", tmp_path, maxTransientFailures="1")), KINDS)
    assert job.spec.fetch.per_host_rate == 1.0 and isinstance(job.spec.fetch.per_host_rate, float)
    assert job.spec.fetch.max_transient_failures == 1.0


@pytest.mark.parametrize(
    "example", sorted((REPO / "manifests" / "examples").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_example_manifest_still_loads(example: Path) -> None:
    assert load_resources(example, KINDS)


# --- the file as a whole, before anything runs -----------------------------------------------------


def test_two_resources_of_one_kind_and_name_are_refused_naming_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, scrape("photos", tmp_path), scrape("photos", tmp_path))
    message = run_file_cli(path)
    assert message.startswith(f"{path}:17: ScrapeJob 'photos' is already defined at line 4 of this file")
    assert not (tmp_path / "photos").exists()


def test_a_reference_to_a_missing_resource_is_refused_before_the_first_resource_runs(tmp_path: Path) -> None:
    path = write(tmp_path, scrape("photos", tmp_path), caption("captions", tmp_path, "other-photos"))
    message = run_file_cli(path)
    assert message == (
        f"{path}: CaptionJob 'captions': spec.input.scrapeJobRef references ScrapeJob 'other-photos', which "
        "is not before it in this file; put that ScrapeJob before it, or give spec.input.uris instead"
    )
    assert not (tmp_path / "photos").exists()


def test_a_reference_to_a_later_resource_is_refused_before_the_first_resource_runs(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        scrape("photos", tmp_path),
        train("model", tmp_path, "    captionJobRef: captions"),
        caption("captions", tmp_path, "photos"),
    )
    message = run_file_cli(path)
    assert message.startswith(f"{path}: TrainRun 'model': spec.dataset.captionJobRef references CaptionJob")
    assert "'captions', which comes after it in this file; move that CaptionJob before it" in message
    assert not (tmp_path / "photos").exists()


@pytest.mark.parametrize("uri", ["s3://", "s3:///x", "ftp://x/y", "s3://Bad_Bucket!/x", "s3:/bucket/x"])
def test_a_bad_storage_uri_is_refused_naming_the_field(tmp_path: Path, uri: str) -> None:
    first = scrape("photos", tmp_path)
    second = caption("captions", tmp_path, "photos").replace(f"uri: {tmp_path / 'captions'}", f'uri: "{uri}"')
    message = run_file_cli(write(tmp_path, first, second))
    assert message.startswith(f"{tmp_path / 'resources.yaml'}: CaptionJob 'captions': spec.output.uri: ")
    assert message.endswith("use a local path or s3://BUCKET/PREFIX")
    assert not (tmp_path / "photos").exists()


@pytest.mark.parametrize("uri", ["s3://", "s3:///x", "ftp://x/y", "s3://Bad_Bucket!/x", "s3:bucket", ""])
def test_check_uri_refuses_what_names_no_place_and_open_storage_does_too(uri: str) -> None:
    with pytest.raises(InvalidURI):
        check_uri(uri)
    with pytest.raises(InvalidURI):
        open_storage(uri)


@pytest.mark.parametrize(
    "uri", ["s3://b", "s3://b/p/q", "s3://my.bucket-1/x", "/tmp/x", "rel/x", "file:///tmp/x"]
)
def test_check_uri_accepts_local_paths_and_s3_buckets(uri: str) -> None:
    check_uri(uri)


def test_a_missing_local_metadata_file_is_refused_before_anything_runs(tmp_path: Path) -> None:
    path = write(tmp_path, scrape("photos", tmp_path))
    (tmp_path / "metadata.tsv").unlink()
    message = run_file_cli(path)
    assert message.startswith(
        f"{path}: ScrapeJob 'photos': spec.source.uri: {tmp_path / 'metadata.tsv'} does"
    )


def test_a_trainrun_whose_dataset_is_missing_fails_before_anything_runs_naming_the_path(
    tmp_path: Path,
) -> None:
    dataset = tmp_path / "never-captioned"
    path = write(tmp_path, scrape("photos", tmp_path), train("model", tmp_path, f"    uris: [{dataset}]"))
    message = run_file_cli(path)
    assert message.startswith(f"{path}: TrainRun 'model': spec.dataset.uris.0 '{dataset}' is not a finished")
    assert f"{dataset}/commercial/index.json does not exist" in message
    assert not (tmp_path / "photos").exists()


def test_a_dataset_an_earlier_resource_writes_is_not_required_to_exist_yet(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        scrape("photos", tmp_path),
        caption("captions", tmp_path, "photos"),
        train("model", tmp_path, f"    uris: [{tmp_path / 'captions'}]"),
    )
    LocalRun.check(load_resources(path, KINDS), path)


def test_rerunning_into_an_output_planned_with_other_settings_is_one_line(tmp_path: Path, yfcc: Any) -> None:
    path = write(tmp_path, scrape("photos", tmp_path))
    yfcc.write_tsv(tmp_path / "metadata.tsv", [yfcc.line(), yfcc.line(photo_id="2911838708")])
    subprocess.run(
        [sys.executable, "-m", "commoncanvas.cli", "scrape", "prepare", str(path)],
        env={**os.environ, "PYTHONPATH": str(REPO / "services")},
        check=True,
        capture_output=True,
        timeout=60,
    )
    path.write_text(path.read_text().replace("unitSize: 10", "unitSize: 20"))
    message = run_cli("scrape", "prepare", str(path))
    assert str(tmp_path / "photos") in message and "use a new" in message


def test_a_trainrun_run_directly_with_a_missing_dataset_fails_before_training_naming_the_path(
    tmp_path: Path,
) -> None:
    from commoncanvas.shardplan import InputMissing

    dataset = tmp_path / "never-captioned"
    path = write(tmp_path, train("model", tmp_path, f"    uris: [{dataset}]"))
    [run] = load_resources(path, KINDS)
    with pytest.raises(
        InputMissing, match=r"spec\.dataset\.uris\.0 .*never-captioned/commercial/index\.json"
    ):
        LocalRun(show_progress=False).train(run)
    assert not (tmp_path / "model").exists()
