"""`podtally inject -f`: the webhook's injection applied offline to workload manifests."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from podtally.injection.decide import decide
from podtally.injection.render import InjectionConfig, inject_pod_spec

# kind → path of the pod template inside the object.
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
    "Pod": (),
}


def inject_object(
    obj: Mapping[str, Any],
    *,
    config: InjectionConfig,
    default_namespace: str,
    namespace_labels: Mapping[str, str],
    operator_namespace: str,
) -> dict[str, Any]:
    """The object with its pod template injected, or unchanged where the rules say no."""
    out = copy.deepcopy(dict(obj))
    kind = out.get("kind")
    if kind not in TEMPLATE_PATHS:
        return out
    meta = out.get("metadata") or {}
    namespace = meta.get("namespace") or default_namespace
    holder: dict[str, Any] = out
    for key in TEMPLATE_PATHS[kind]:
        holder = holder.setdefault(key, {})
    if not decide(holder, namespace, namespace_labels,
                  operator_namespace=operator_namespace).inject:
        return out
    workload = str(meta.get("name") or meta.get("generateName", "").rstrip("-"))
    injected = inject_pod_spec(holder, config=config, workload=workload,
                               namespace_labels=namespace_labels)
    holder.clear()
    holder.update(injected)
    return out


def inject_documents(
    docs: Iterable[Any], **kwargs: Any
) -> list[Any]:
    """Every document of a multi-document manifest; `List` kinds are walked."""
    out: list[Any] = []
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "List":
            items = [inject_object(i, **kwargs) if isinstance(i, dict) else i
                     for i in doc.get("items", [])]
            out.append({**doc, "items": items})
        elif isinstance(doc, dict):
            out.append(inject_object(doc, **kwargs))
        else:
            out.append(doc)
    return out
