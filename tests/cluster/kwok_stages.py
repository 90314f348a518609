"""kwok Stages that play the kubelet for pods on fake nodes.

A pod bound to a kwok node goes Pending -> Running at once; a Job's pod then goes to Succeeded after
``run_seconds`` (or the duration in its ``commoncanvas.dev/test-run-duration`` annotation, e.g.
"30s"). A pod annotated ``commoncanvas.dev/test-fail: "true"`` goes to Failed instead, with exit
code 1 or the one in ``commoncanvas.dev/test-exit-code``. Pods not owned by a Job keep running.
Node stages are kwok's defaults (initialise, then heartbeat through the node Lease).
"""

from __future__ import annotations

from typing import Any

import yaml

FAIL_ANNOTATION = "commoncanvas.dev/test-fail"
EXIT_CODE_ANNOTATION = "commoncanvas.dev/test-exit-code"
RUN_DURATION_ANNOTATION = "commoncanvas.dev/test-run-duration"

_POD_READY_STATUS = """\
{{ $now := Now }}
conditions:
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: PodReadyToStartContainers
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Initialized
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Ready
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: ContainersReady
{{ range .spec.readinessGates }}
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: {{ .conditionType | Quote }}
{{ end }}
containerStatuses:
{{ range .spec.containers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: true
  restartCount: 0
  started: true
  state:
    running:
      startedAt: {{ $now | Quote }}
{{ end }}
initContainerStatuses:
{{ range .spec.initContainers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: true
  restartCount: 0
  state:
    terminated:
      exitCode: 0
      finishedAt: {{ $now | Quote }}
      reason: Completed
      startedAt: {{ $now | Quote }}
{{ end }}
hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
podIP: {{ PodIPWith .spec.nodeName ( or .spec.hostNetwork false ) ( or .metadata.uid "" ) \
( or .metadata.name "" ) ( or .metadata.namespace "" ) | Quote }}
phase: Running
startTime: {{ $now | Quote }}
"""

# Ready/ContainersReady turn False when the containers end, as a kubelet reports it. Every condition
# is written out because kwok may send a merge patch, which replaces the list whole.
_TERMINATED_STATUS = """\
{{{{ $now := Now }}}}
conditions:
{{{{ range .status.conditions }}}}
- type: {{{{ .type | Quote }}}}
{{{{ if or (eq .type "Ready") (eq .type "ContainersReady") }}}}
  status: "False"
  reason: PodCompleted
  lastTransitionTime: {{{{ $now | Quote }}}}
{{{{ else }}}}
  status: {{{{ .status | Quote }}}}
{{{{ with .reason }}}}
  reason: {{{{ . | Quote }}}}
{{{{ end }}}}
{{{{ with .message }}}}
  message: {{{{ . | Quote }}}}
{{{{ end }}}}
{{{{ with .lastTransitionTime }}}}
  lastTransitionTime: {{{{ . | Quote }}}}
{{{{ end }}}}
{{{{ end }}}}
{{{{ end }}}}
containerStatuses:
{{{{ range .spec.containers }}}}
- image: {{{{ .image | Quote }}}}
  name: {{{{ .name | Quote }}}}
  ready: false
  restartCount: 0
  started: false
  state:
    terminated:
      exitCode: {exit_code}
      finishedAt: {{{{ $now | Quote }}}}
      reason: {reason}
      startedAt: {{{{ $now | Quote }}}}
{{{{ end }}}}
phase: {phase}
"""


def _not_deleted_and_running() -> list[dict[str, Any]]:
    return [
        {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"},
        {"key": ".status.phase", "operator": "In", "values": ["Running"]},
    ]


def _delay(run_seconds: float) -> dict[str, Any]:
    return {
        "durationMilliseconds": int(run_seconds * 1000),
        "durationFrom": {"expressionFrom": f'.metadata.annotations["{RUN_DURATION_ANNOTATION}"]'},
    }


def pod_stages(run_seconds: float) -> list[dict[str, Any]]:
    def stage(name: str, selector: dict[str, Any], next_: dict[str, Any], delay: float | None = None) -> Any:
        spec: dict[str, Any] = {
            "resourceRef": {"apiGroup": "v1", "kind": "Pod"},
            "selector": selector,
            "next": next_,
        }
        if delay is not None:
            spec["delay"] = _delay(delay)
        return {
            "apiVersion": "kwok.x-k8s.io/v1alpha1",
            "kind": "Stage",
            "metadata": {"name": name},
            "spec": spec,
        }

    fail_exit_code = f'{{{{ or (index $.metadata.annotations "{EXIT_CODE_ANNOTATION}") 1 }}}}'
    return [
        stage(
            "pod-ready",
            {
                "matchExpressions": [
                    {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"},
                    {"key": ".status.podIP", "operator": "DoesNotExist"},
                ]
            },
            {"statusTemplate": _POD_READY_STATUS},
        ),
        stage(
            "pod-complete",
            {
                "matchExpressions": [
                    *_not_deleted_and_running(),
                    {"key": ".metadata.ownerReferences.[].kind", "operator": "In", "values": ["Job"]},
                    {
                        "key": f'.metadata.annotations["{FAIL_ANNOTATION}"]',
                        "operator": "NotIn",
                        "values": ["true"],
                    },
                ]
            },
            {"statusTemplate": _TERMINATED_STATUS.format(exit_code=0, reason="Completed", phase="Succeeded")},
            delay=run_seconds,
        ),
        stage(
            "pod-fail",
            {
                "matchExpressions": [
                    *_not_deleted_and_running(),
                    {
                        "key": f'.metadata.annotations["{FAIL_ANNOTATION}"]',
                        "operator": "In",
                        "values": ["true"],
                    },
                ]
            },
            {
                "statusTemplate": _TERMINATED_STATUS.format(
                    exit_code=fail_exit_code, reason="Error", phase="Failed"
                )
            },
            delay=run_seconds,
        ),
        # A deleted pod on a fake node ends as a kubelet ends it: containers killed (Failed, 137),
        # then the pod object is deleted with grace 0. Finalizers stay: the Job controller owns its own.
        stage(
            "pod-terminate",
            {
                "matchExpressions": [
                    {"key": ".metadata.deletionTimestamp", "operator": "Exists"},
                    {"key": ".status.phase", "operator": "NotIn", "values": ["Succeeded", "Failed"]},
                ]
            },
            {"statusTemplate": _TERMINATED_STATUS.format(exit_code=137, reason="Error", phase="Failed")},
        ),
        stage(
            "pod-delete",
            {
                "matchExpressions": [
                    {"key": ".metadata.deletionTimestamp", "operator": "Exists"},
                    {"key": ".status.phase", "operator": "In", "values": ["Succeeded", "Failed"]},
                ]
            },
            {"delete": True},
        ),
    ]


def kwok_config(run_seconds: float) -> str:
    return yaml.safe_dump_all(pod_stages(run_seconds), sort_keys=False)
