"""Whether a pod gets the sidecar: one function, Istio's order."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

INJECT_KEY = "podtally.io/inject"
STATUS_ANNOTATION = "podtally.io/status"
NAMESPACE_ENABLED = "enabled"
ALWAYS_EXCLUDED = frozenset({"kube-system", "kube-public"})


@dataclass(frozen=True)
class Decision:
    inject: bool
    reason: str  # a short, bounded word: used as a metric label


def decide(
    pod: Mapping[str, Any],
    namespace: str,
    namespace_labels: Mapping[str, str],
    *,
    operator_namespace: str,
) -> Decision:
    """In order: hostNetwork pods and excluded namespaces never; an already injected pod is
    left alone; then the pod's own label, then its annotation, wins; then the namespace."""
    spec = pod.get("spec") or {}
    meta = pod.get("metadata") or {}
    if spec.get("hostNetwork"):
        return Decision(False, "host-network")
    if namespace in ALWAYS_EXCLUDED or namespace == operator_namespace:
        return Decision(False, "excluded-namespace")
    if STATUS_ANNOTATION in (meta.get("annotations") or {}):
        return Decision(False, "already-injected")
    for source in (meta.get("labels") or {}, meta.get("annotations") or {}):
        value = str(source.get(INJECT_KEY, "")).strip().lower()
        if value in ("true", "enabled"):
            return Decision(True, "pod-opt-in")
        if value in ("false", "disabled"):
            return Decision(False, "pod-opt-out")
    if namespace_labels.get(INJECT_KEY) == NAMESPACE_ENABLED:
        return Decision(True, "namespace")
    return Decision(False, "namespace-not-enabled")
