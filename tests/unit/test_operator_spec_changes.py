"""Which spec edits the operator takes under running work, and how it says no to the others."""

from __future__ import annotations

import copy
from typing import Any

from commoncanvas_operator import builders, reducers

SPEC: dict[str, Any] = {
    "source": {"uri": "s3://b/yfcc.tsv"},
    "output": {"uri": "s3://b/catalog"},
    "fetch": {"concurrency": 64, "retries": 4},
    "licenses": {"allow": ["CC-BY", "CC-BY-SA"]},
    "parallelism": 4,
}


def job_file(spec: dict[str, Any]) -> dict[str, Any]:
    body = {"apiVersion": "commoncanvas.dev/v1alpha1", "kind": "ScrapeJob", "metadata": {"name": "s"}}
    return builders.build_job_file(builders.resolve_resource({**body, "spec": spec}, None), spec)


def edited(**changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(SPEC)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target = spec
        for key in parents:
            target = target.setdefault(key, {})
        target[leaf] = value
    return spec


def test_differences_are_dotted_paths_and_a_list_is_one_field() -> None:
    wanted = edited(fetch__retries=2, licenses__allow=["CC-BY"], filters__minSide=64)
    assert reducers.spec_differences(SPEC, wanted) == [
        "spec.fetch.retries",
        "spec.filters",
        "spec.licenses.allow",
    ]


def test_no_children_yet_or_the_same_spec_is_never_refused() -> None:
    assert reducers.refused_change(None, edited(fetch__retries=0)) == ""
    assert reducers.refused_change(job_file(SPEC), copy.deepcopy(SPEC)) == ""


def test_parallelism_and_suspend_change_in_place() -> None:
    assert reducers.refused_change(job_file(SPEC), edited(parallelism=16)) == ""
    assert reducers.refused_change(job_file(SPEC), edited(suspend=True)) == ""


def test_a_change_running_pods_cannot_take_is_refused_naming_the_fields() -> None:
    message = reducers.refused_change(job_file(SPEC), edited(fetch__concurrency=8, parallelism=2))
    assert message.startswith("spec.fetch.concurrency changed after this resource's work started")
    assert "parallelism" not in message.split(" changed")[0]
    assert "create a new resource" in message


def test_an_output_change_says_where_the_work_already_writes() -> None:
    message = reducers.refused_change(job_file(SPEC), edited(output__uri="s3://b/other"))
    assert message == (
        "spec.output.uri changed from s3://b/catalog to s3://b/other, but this resource's work already "
        "writes to s3://b/catalog; set it back, or create a new resource for a new output"
    )


def test_a_job_file_without_the_recorded_spec_still_guards_the_output() -> None:
    old = job_file(SPEC)
    del old["metadata"]["annotations"]
    assert reducers.refused_change(old, edited(fetch__retries=0)) == ""
    assert "spec.output.uri changed" in reducers.refused_change(old, edited(output__uri="s3://b/x"))


def test_kopfs_bookkeeping_never_reaches_a_pod_template() -> None:
    """kopf rewrites its annotations on every spec change; a Job's template must stay as applied."""
    from commoncanvas_operator.settings import Settings

    body = {
        "apiVersion": "commoncanvas.dev/v1alpha1",
        "kind": "ScrapeJob",
        "metadata": {
            "name": "s",
            "annotations": {
                "commoncanvas.dev/last-handled-configuration": '{"spec": {}}',
                "commoncanvas.dev/kopf-managed": "yes",
                "commoncanvas.dev/test-run-duration": "5s",
            },
        },
        "spec": SPEC,
    }
    template = builders.build_stage_job(body, "units", Settings(), units=2)["spec"]["template"]
    assert template["metadata"]["annotations"] == {"commoncanvas.dev/test-run-duration": "5s"}
