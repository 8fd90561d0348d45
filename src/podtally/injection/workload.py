"""The owning workload of a pod: what chargeback groups by (never the pod name).

At admission a pod's owner is usually its ReplicaSet or Job; the workload is one level up
(Deployment, CronJob). The webhook can ask the API server (`lookup`); where it cannot, the
names Kubernetes' own controllers generate give the answer: a ReplicaSet is
`<deployment>-<pod-template-hash>`, a CronJob's Job `<cronjob>-<scheduled minutes>`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

# (kind, namespace, name) → that object's controller owner as (kind, name), or None.
OwnerLookup = Callable[[str, str, str], tuple[str, str] | None]

_CRONJOB_SUFFIX = re.compile(r"^(?P<base>.+)-\d{8,}$")


def controller_owner(meta: Mapping[str, Any]) -> tuple[str, str] | None:
    refs = meta.get("ownerReferences") or []
    for ref in refs:
        if ref.get("controller"):
            return str(ref.get("kind", "")), str(ref.get("name", ""))
    return (str(refs[0].get("kind", "")), str(refs[0].get("name", ""))) if refs else None


def resolve_workload(
    pod: Mapping[str, Any], namespace: str, lookup: OwnerLookup | None = None
) -> tuple[str, str]:
    """(kind, name) of the workload that owns the pod; a bare pod is its own workload."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    owner = controller_owner(meta)
    if owner is None:
        return "Pod", str(meta.get("name") or meta.get("generateName", "").rstrip("-") or "unknown")
    kind, name = owner
    if kind in ("ReplicaSet", "Job"):
        parent = lookup(kind, namespace, name) if lookup else None
        if parent is not None:
            return parent
        if kind == "ReplicaSet":
            template_hash = labels.get("pod-template-hash")
            if template_hash and name.endswith(f"-{template_hash}"):
                return "Deployment", name.removesuffix(f"-{template_hash}")
        if kind == "Job" and lookup is None:
            m = _CRONJOB_SUFFIX.match(name)
            if m:
                return "CronJob", m["base"]
    return kind, name
