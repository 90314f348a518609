"""The operator's builders: a custom resource -> the Jobs and ConfigMap that run it."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from commoncanvas.specs import KINDS, load_resources
from commoncanvas_operator import builders
from commoncanvas_operator.settings import Settings

SETTINGS = Settings()


def scrape_job(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "commoncanvas.dev/v1alpha1",
        "kind": "ScrapeJob",
        "metadata": {"name": "yfcc", "namespace": "data", "annotations": {"commoncanvas.dev/x": "1"}},
        "spec": {"source": {"uri": "s3://b/meta.tsv"}, "output": {"uri": "s3://b/catalog"}, **spec},
    }


def caption_job(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "commoncanvas.dev/v1alpha1",
        "kind": "CaptionJob",
        "metadata": {"name": "caps", "namespace": "data"},
        "spec": {"input": {"scrapeJobRef": "yfcc"}, "output": {"uri": "s3://b/captions"}, **spec},
    }


def test_units_job_is_an_elastic_indexed_job_of_workers_that_ignores_disruptions() -> None:
    job = builders.build_stage_job(scrape_job(parallelism=3), "units", SETTINGS, units=5000)

    spec = job["spec"]
    assert job["metadata"]["name"] == "yfcc-units"
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 3, "one completion per worker, not per unit"
    few = builders.build_stage_job(scrape_job(parallelism=8), "units", SETTINGS, units=5)["spec"]
    assert few["completions"] == few["parallelism"] == 5, "never more workers than units"
    assert spec["backoffLimitPerIndex"] == SETTINGS.backoff_limit_per_index
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    ]
    assert "ttlSecondsAfterFinished" not in spec
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    [container] = pod["containers"]
    assert container["command"] + container["args"] == ["commoncanvas", "scrape", "work", builders.JOB_FILE]
    assert spec["template"]["metadata"]["annotations"] == {"commoncanvas.dev/x": "1"}


def test_worker_pods_get_object_store_settings_from_the_chart_and_a_named_metrics_port() -> None:
    container = builders.build_stage_job(scrape_job(), "units", SETTINGS, units=1)["spec"]["template"][
        "spec"
    ]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == SETTINGS.object_store_secret
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "AWS_SECRET_ACCESS_KEY"
    assert env["S3_ENDPOINT_URL"]["valueFrom"]["configMapKeyRef"]["name"] == SETTINGS.object_store_config
    assert env["METRICS_PORT"]["value"] == "9400"
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400}]
    assert container["volumeMounts"][0]["mountPath"] == builders.JOB_FILE_DIR


def test_caption_units_request_gpus_on_the_named_pool() -> None:
    pod = builders.build_stage_job(caption_job(gpusPerPod=2), "units", SETTINGS, units=3)["spec"]["template"][
        "spec"
    ]

    assert pod["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": "2"}}
    assert pod["containers"][0]["image"] == SETTINGS.gpu_image
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_plan_pod_runs_on_the_control_pool_without_gpus_and_reports_its_unit_count() -> None:
    settings = Settings.from_dict(
        {"pools": {"a100": {}, "ctl": {"nodeSelector": {"p": "ctl"}}}, "controlPool": "ctl"}
    )
    job = builders.build_stage_job(caption_job(), "plan", settings)

    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"] == [
        "caption",
        "prepare",
        builders.JOB_FILE,
        "--termination-log",
        "/dev/termination-log",
    ]
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert "resources" not in container
    assert pod["nodeSelector"] == {"p": "ctl"}
    assert job["spec"]["completions"] == 1 and "completionMode" not in job["spec"]


def test_unknown_node_pool_is_named_in_the_error() -> None:
    with pytest.raises(KeyError, match="'h100'"):
        builders.build_stage_job(caption_job(nodePool="h100"), "units", SETTINGS, units=1)


def test_job_file_replaces_the_upstream_reference_with_its_output_uri_and_validates() -> None:
    resource = builders.resolve_resource(caption_job(), "s3://b/catalog")
    config_map = builders.build_job_file(resource, caption_job()["spec"])

    assert config_map["metadata"]["name"] == "caps-job"
    text = config_map["data"]["job.yaml"]
    assert yaml.safe_load(text)["spec"]["input"] == {"uris": ["s3://b/catalog"]}
    assert builders.applied_output_uri(config_map) == "s3://b/captions"


def test_job_file_is_what_the_worker_cli_loads(tmp_path: Any) -> None:
    for body, uri in ((scrape_job(unitSize=10), None), (caption_job(), "s3://b/catalog")):
        path = tmp_path / f"{body['kind']}.yaml"
        config_map = builders.build_job_file(builders.resolve_resource(body, uri), body["spec"])
        path.write_text(config_map["data"]["job.yaml"])
        [resource] = load_resources(path, KINDS)
        assert resource.kind == body["kind"]


def test_a_referenced_upstream_without_output_is_an_error() -> None:
    with pytest.raises(ValueError, match="ScrapeJob yfcc"):
        builders.resolve_resource(caption_job(), None)


def test_children_are_labelled_with_their_owner_and_step() -> None:
    job = builders.build_stage_job(scrape_job(), "finalize", SETTINGS)
    assert job["metadata"]["labels"]["commoncanvas.dev/resource"] == "yfcc"
    assert job["metadata"]["labels"]["commoncanvas.dev/step"] == "finalize"
    assert job["metadata"]["labels"]["app.kubernetes.io/managed-by"] == builders.MANAGER


def test_settings_reject_unknown_keys_and_bad_values_naming_the_field() -> None:
    with pytest.raises(ValueError, match="cpuImag"):
        Settings.from_dict({"cpuImag": "x"})
    with pytest.raises(ValueError, match="workerSecurityContexts"):
        Settings.from_dict({"workerSecurityContexts": {}})
    with pytest.raises(ValueError, match="workerPodSecurityContext: Input should be a valid dictionary"):
        Settings.from_dict({"workerPodSecurityContext": ["runAsNonRoot"]})
    with pytest.raises(ValueError, match=r"pools\.a100\.tolerations: Input should be a valid list"):
        Settings.from_dict({"pools": {"a100": {"tolerations": "all"}}})
    with pytest.raises(ValueError, match="reconcileSeconds: Input should be a valid number"):
        Settings.from_dict({"reconcileSeconds": "often"})
    assert Settings.from_dict({"pools": {"cpu": {"nodeSelector": None}}}).pool("cpu").node_selector == {}


def stage_pods(settings: Settings = SETTINGS) -> list[tuple[str, dict[str, Any]]]:
    """(description, pod spec) of every Job of both sharded kinds."""
    bodies = {"ScrapeJob": scrape_job(), "CaptionJob": caption_job()}
    return [
        (
            f"{kind} {step}",
            builders.build_stage_job(body, step, settings, units=2)["spec"]["template"]["spec"],
        )
        for kind, body in bodies.items()
        for step in builders.STEPS
    ]


def test_every_stage_pod_is_hardened_and_writes_only_under_its_tmp_emptydir() -> None:
    for what, pod in stage_pods():
        assert pod["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        }, what
        [container] = pod["containers"]
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }, what
        assert {"name": "tmp", "emptyDir": {}} in pod["volumes"], what
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], what
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HOME"] == "/tmp/home" and env["TMPDIR"] == "/tmp", what
        assert env["HF_HOME"] == "/tmp/home/.cache/huggingface", what
        # Every volume the container mounts exists, once.
        names = [v["name"] for v in pod["volumes"]]
        assert sorted(names) == sorted({m["name"] for m in container["volumeMounts"]}), what


def test_the_default_user_is_the_worker_images_user() -> None:
    from pathlib import Path

    images = Path(__file__).resolve().parents[2] / "images"
    for dockerfile in ("worker.Dockerfile", "worker-gpu.Dockerfile"):
        users = [
            line.split()[1]
            for line in (images / dockerfile).read_text().splitlines()
            if line.startswith("USER ")
        ]
        assert users == ["10001:10001"], dockerfile
    context = SETTINGS.worker_pod_security_context
    assert f"{context['runAsUser']}:{context['runAsGroup']}" == "10001:10001"


def test_security_context_and_resources_settings_reach_every_stage_pod() -> None:
    settings = Settings.from_dict(
        {
            "workerPodSecurityContext": {"runAsNonRoot": True, "runAsUser": 2000},
            "workerSecurityContext": None,  # a chart value set to null: no container securityContext
            "workerResources": {"requests": {"cpu": "500m"}, "limits": {"memory": "1Gi"}},
        }
    )
    for what, pod in stage_pods(settings):
        assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 2000}, what
        [container] = pod["containers"]
        assert "securityContext" not in container, what
        gpus = {builders.GPU_RESOURCE: "1"} if what == "CaptionJob units" else {}
        assert container["resources"] == {
            "requests": {"cpu": "500m"},
            "limits": {"memory": "1Gi", **gpus},
        }, what
        # The scratch dir stays: it is where the workers write whatever the root filesystem is.
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], what
    # Each pod has its own copies: changing one changes neither the settings nor the next pod.
    pod = stage_pods(settings)[0][1]
    pod["securityContext"]["runAsUser"] = 0
    pod["containers"][0]["resources"]["limits"]["memory"] = "2Gi"
    assert settings.worker_pod_security_context["runAsUser"] == 2000
    assert settings.worker_resources["limits"] == {"memory": "1Gi"}
    assert Settings.from_dict({"workerSecurityContext": {}}).worker_security_context == {}


def test_operator_defaults_are_the_charts() -> None:
    from pathlib import Path

    values = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "charts" / "commoncanvas" / "values.yaml").read_text()
    )["workers"]
    assert values["podSecurityContext"] == SETTINGS.worker_pod_security_context
    assert values["securityContext"] == SETTINGS.worker_security_context
    assert values["resources"] == SETTINGS.worker_resources == {}


def test_the_charts_crds_are_the_generated_ones() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for generated in sorted((root / "manifests" / "crds").glob("*.yaml")):
        assert (
            root / "charts" / "commoncanvas" / "crds" / generated.name
        ).read_text() == generated.read_text()


def test_metrics_linger_reaches_every_worker_pod_only_when_set() -> None:
    from tests.unit.test_operator_train import train_job

    def linger(pod: dict[str, Any]) -> list[str]:
        env = pod["containers"][0]["env"]
        return [e["value"] for e in env if e["name"] == "METRICS_LINGER_SECONDS"]

    lingering = Settings(metrics_linger_seconds=15)
    for what, pod in stage_pods(lingering):
        assert linger(pod) == ["15"], what
    assert linger(train_job(settings=lingering)["spec"]["template"]["spec"]) == ["15"]
    assert all(linger(pod) == [] for _, pod in stage_pods())
    assert Settings.from_dict({"metricsLingerSeconds": 2.5}).metrics_linger_seconds == 2.5


def test_a_shared_model_cache_is_mounted_in_worker_pods_and_named_to_the_loader() -> None:
    shared = SETTINGS.model_copy(update={"model_cache": {"persistentVolumeClaim": {"claimName": "models"}}})
    pod = builders.build_stage_job(caption_job(), "units", shared, units=4)["spec"]["template"]["spec"]
    [container] = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[builders.MODEL_CACHE_VOLUME]["persistentVolumeClaim"] == {"claimName": "models"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[builders.MODEL_CACHE_VOLUME] == builders.MODEL_CACHE_DIR
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["COMMONCANVAS_MODEL_CACHE"] == builders.MODEL_CACHE_DIR
    assert env["HF_HOME"].startswith(builders.MODEL_CACHE_DIR)
    assert [e["name"] for e in container["env"]].count("HF_HOME") == 1
    plain = builders.build_stage_job(caption_job(), "units", SETTINGS, units=4)["spec"]["template"]["spec"]
    assert builders.MODEL_CACHE_VOLUME not in {v["name"] for v in plain["volumes"]}


def test_pods_take_the_resources_priority_class_else_their_pools() -> None:
    from commoncanvas_operator.settings import NodePool

    settings = Settings(
        pools={
            "a100": NodePool(priority_class_name="gpu-batch"),
            "cpu": NodePool(priority_class_name="cpu-batch"),
        }
    )
    caption = builders.build_stage_job(caption_job(), "units", settings, units=2)["spec"]["template"]["spec"]
    assert caption["priorityClassName"] == "gpu-batch"
    plan = builders.build_stage_job(caption_job(), "plan", settings)["spec"]["template"]["spec"]
    assert plan["priorityClassName"] == "cpu-batch"
    urgent = caption_job(priorityClassName="urgent")
    assert (
        builders.build_stage_job(urgent, "units", settings, units=2)["spec"]["template"]["spec"][
            "priorityClassName"
        ]
        == "urgent"
    )
    assert (
        "priorityClassName"
        not in builders.build_stage_job(scrape_job(), "units", SETTINGS, units=2)["spec"]["template"]["spec"]
    )
