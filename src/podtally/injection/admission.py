"""AdmissionReview v1 for pod CREATE: decide, inject, answer with an RFC 6902 patch."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jsonpatch

from podtally.injection.decide import Decision, decide
from podtally.injection.render import InjectionConfig, TemplatePath, inject_pod_spec
from podtally.injection.workload import OwnerLookup, resolve_workload


@dataclass(frozen=True)
class Outcome:
    response: dict[str, Any]  # the AdmissionReview to send back
    decision: Decision


def review(
    request_review: Mapping[str, Any],
    *,
    config: InjectionConfig,
    namespace_labels: Mapping[str, str],
    operator_namespace: str,
    lookup: OwnerLookup | None = None,
    template_path: TemplatePath | None = None,
) -> Outcome:
    req = request_review.get("request") or {}
    uid = req.get("uid", "")
    pod = req.get("object") or {}
    namespace = req.get("namespace") or (pod.get("metadata") or {}).get("namespace") or "default"
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    decision = Decision(False, "not-a-pod-create")
    if req.get("kind", {}).get("kind") == "Pod" and req.get("operation") == "CREATE":
        decision = decide(pod, namespace, namespace_labels, operator_namespace=operator_namespace)
    if decision.inject:
        _, workload = resolve_workload(pod, namespace, lookup)
        mutated = inject_pod_spec(pod, config=config, workload=workload,
                                  namespace_labels=namespace_labels, template_path=template_path)
        patch = jsonpatch.make_patch(pod, mutated).patch
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    return Outcome(
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response},
        decision,
    )
