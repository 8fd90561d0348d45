"""Render the injection template (chart data) from a typed context, and merge it into a pod."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from typing import Any

import jinja2
import yaml
from pydantic import BaseModel, ConfigDict, Field

from podtally.injection.decide import STATUS_ANNOTATION

# Variables that point TLS clients at a CA bundle: OpenSSL/Python ssl, requests, curl,
# Node.js (extra CAs), the AWS SDKs. Never overridden where the app set them itself.
TRUST_ENV = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
             "AWS_CA_BUNDLE")
SIDECAR_NAME = "podtally-sidecar"
INIT_NAME = "podtally-init"


class InjectionConfig(BaseModel):
    """Operator-wide injection settings (chart values → operator flags)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image: str = "ghcr.io/podtally/podtally:0.1.0"
    """One image runs both the init step and the sidecar."""
    image_pull_policy: str = "IfNotPresent"
    native_sidecar: bool = True
    """Kubernetes 1.29+: the sidecar is an init container with restartPolicy Always, so it
    starts before the app and outlives it (Jobs finish); else a plain container."""
    proxy_uid: int = 1337
    proxy_port: int = 15001
    metrics_port: int = 15090
    redirect_ports: tuple[int, ...] = (443, 80)
    exclude_cidrs: tuple[str, ...] = ()
    team_labels: tuple[str, ...] = ("team",)
    """Ordered; the first present on the pod wins, then the same keys on the namespace."""
    llm_hosts: tuple[str, ...] = ()
    drain_timeout: float = 25.0
    ca_secret: str = "podtally-ca"
    """Per-namespace Secret holding that namespace's podtally CA (tls.crt, tls.key)."""
    trust_bundle: str = "podtally-trust-bundle"
    """Per-namespace ConfigMap: system CAs plus the namespace's podtally CA."""
    sidecar_resources: dict[str, Any] = Field(default_factory=lambda: {
        "requests": {"cpu": "20m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}})
    init_resources: dict[str, Any] = Field(default_factory=lambda: {
        "requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}})


TemplatePath = str | os.PathLike[str]


def _template(path: TemplatePath | None) -> jinja2.Template:
    """The packaged template, or the file at `path` (the chart's ConfigMap copy, which may be
    updated in place: keyed by mtime, so an edit is picked up without a restart)."""
    if path is None:
        return _compile(None, 0)
    return _compile(os.fspath(path), os.stat(path).st_mtime_ns)


@lru_cache(maxsize=8)
def _compile(path: str | None, _mtime_ns: int) -> jinja2.Template:
    if path is None:
        text = resources.files("podtally.injection").joinpath("template.yaml").read_text()
    else:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False,
                             keep_trailing_newline=True)
    return env.from_string(text)


def render_parts(
    config: InjectionConfig, workload: str, *, template_path: TemplatePath | None = None
) -> dict[str, Any]:
    """The template rendered for one workload; `template_path` None is the packaged copy."""
    context = {**config.model_dump(), "workload": workload, "trust_env": TRUST_ENV}
    parts: dict[str, Any] = yaml.safe_load(_template(template_path).render(**context))
    return parts


def _with_trust(container: dict[str, Any], parts: Mapping[str, Any]) -> dict[str, Any]:
    env = container.setdefault("env", [])
    present = {e.get("name") for e in env}
    env.extend(copy.deepcopy(e) for e in parts["appEnv"] if e["name"] not in present)
    mounts = container.setdefault("volumeMounts", [])
    taken = {m.get("mountPath") for m in mounts} | {m.get("name") for m in mounts}
    mounts.extend(copy.deepcopy(m) for m in parts["appVolumeMounts"]
                  if m["mountPath"] not in taken and m["name"] not in taken)
    return container


def inject_pod_spec(
    template: Mapping[str, Any],
    *,
    config: InjectionConfig,
    workload: str,
    namespace_labels: Mapping[str, str],
    template_path: TemplatePath | None = None,
) -> dict[str, Any]:
    """A pod (or a pod template: metadata + spec) with podtally injected. Pure (but for
    reading the template file)."""
    pod = copy.deepcopy(dict(template))
    parts = render_parts(config, workload, template_path=template_path)
    meta = pod.setdefault("metadata", {})
    spec = pod.setdefault("spec", {})

    labels = meta.setdefault("labels", {})
    if not any(labels.get(k) for k in config.team_labels):
        for key in config.team_labels:  # the namespace's team, copied onto the pod
            if namespace_labels.get(key):
                labels[key] = namespace_labels[key]
                break

    app_inits = [_with_trust(c, parts) for c in spec.get("initContainers", [])]
    spec["containers"] = [_with_trust(c, parts) for c in spec.get("containers", [])]
    sidecar = parts["sidecar"]
    inits = [*parts["initContainers"]]
    if config.native_sidecar:
        inits.append({**sidecar, "restartPolicy": "Always"})
    else:
        spec["containers"].append(sidecar)
    # Istio's order: redirect first, then the sidecar, then the app's own init containers,
    # whose traffic is then metered like the app's.
    spec["initContainers"] = inits + app_inits

    names = {v.get("name") for v in spec.get("volumes", [])}
    spec.setdefault("volumes", []).extend(v for v in parts["volumes"] if v["name"] not in names)

    annotations = meta.setdefault("annotations", {})
    annotations[STATUS_ANNOTATION] = json.dumps(
        {"version": 1, "workload": workload, "config": _digest(config)}, sort_keys=True)
    annotations.setdefault("kubectl.kubernetes.io/default-container",
                            spec["containers"][0]["name"] if spec["containers"] else SIDECAR_NAME)
    return pod


def _digest(config: InjectionConfig) -> str:
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:12]
