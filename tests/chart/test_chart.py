"""The Helm chart, rendered by Helm's own engine and checked object by object.

Helm (helm-sdkpy: Helm 4's Go code) lints the chart and installs it, once per set of values,
into an in-memory API server (see helm_engine.py). Every rendered object of a built-in kind is
validated against the Kubernetes 1.30 OpenAPI schema in strict mode (kubernetes-validate);
the Prometheus Operator and cert-manager kinds, for which it has no schema, are checked
against closed structural schemas written here (metadata against the real ObjectMeta). The
Prometheus rules and the dashboard's queries are checked by promtool, the rules also by unit
tests in Prometheus' own engine.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from podtally.injection.decide import decide
from podtally.injection.render import InjectionConfig, inject_pod_spec, render_parts

from . import helm_engine

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "podtally"
K8S = "1.30.0"  # the chart needs >= 1.29 (native sidecars); validate against 1.30
NAMESPACE = "podtally-system"
RELEASE = "podtally"
# `make test` installs Debian's prometheus (promtool); without it these fail, never skip.
PROMTOOL = shutil.which("promtool") or "promtool"

# Everything optional on, and the non-default branches of the templates.
ALL_ON: dict[str, Any] = {
    "imagePullSecrets": [{"name": "regcred"}],
    "serviceAccount": {"annotations": {"example.com/role": "podtally"}},
    "operator": {
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/scrape": "true"},
        "podLabels": {"example.com/tier": "platform"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "platform", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]}]}]}}},
        "topologySpreadConstraints": [
            {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"},
            {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
             "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "podtally"}}},
        ],
    },
    "webhook": {"failurePolicy": "Ignore", "reinvocationPolicy": "IfNeeded",
                "namespaceSelector": {"matchLabels": {"podtally.io/inject": "enabled"},
                                      "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["system"]}]},
                "excludedNamespaces": ["kube-system", "kube-public", "monitoring"]},
    "certManager": {"enabled": True},
    "injection": {"nativeSidecar": False, "llmHosts": ["vllm.ml.svc.cluster.local=openai_compatible"],
                  "excludeCidrs": ["10.96.0.0/12"], "drainTimeout": 12.5},
    "attribution": {"teamLabels": ["team", "example.com/cost-center"]},
    "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}, "scrapeTimeout": "10s",
                   "metricRelabelings": [{"sourceLabels": ["model"], "regex": "(.*)-preview", "targetLabel": "model",
                                          "replacement": "$1", "action": "replace"}]},
    "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}, "interval": "1m",
                       "budget": {"teams": {"payments": 500, "research": 2000}, "labels": {"routing": "finops"}}},
    "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "LLM"}},
    "ebpfAgent": {"enabled": True, "priorityClassName": "system-node-critical",
                  "podAnnotations": {"prometheus.io/scrape": "true"}, "podLabels": {"tier": "node"}},
}
EXTERNAL_ISSUER = {"certManager": {"enabled": True, "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer",
                                                                   "group": "cert-manager.io"}}}
SINGLE = {"operator": {"replicas": 1, "leaderElection": {"enabled": False}},
          "podDisruptionBudget": {"enabled": False}, "rbac": {"create": True},
          "webhook": {"podOptIn": {"enabled": False}}}
LONG_NAME = {"fullnameOverride": "p" * 70, "ebpfAgent": {"enabled": True}}
# The node agent with coverage endpoints, a cgroup scope and the sidecar's own settings.
EBPF_AGENT = {"ebpfAgent": {"enabled": True, "llmEndpoints": ["10.96.40.0/24:8000=openai_compatible"],
                            "cgroupScope": "/sys/fs/cgroup/kubepods.slice", "ringBufferPages": 256},
              "injection": {"llmHosts": ["vllm.ml.svc.cluster.local=openai_compatible"]},
              "attribution": {"teamLabels": ["team", "example.com/cost-center"]}}
# The monitoring objects' other branches: no relabelings, no interval, no warning alert.
MONITORING_BARE = {"podMonitor": {"enabled": True, "relabelings": [], "interval": ""},
                   "prometheusRule": {"enabled": True, "budget": {"teams": {"ops": 100}, "warningRatio": 0}}}

RENDERS: dict[str, dict[str, Any]] = {
    "default": {},
    "all-on": ALL_ON,
    "external-issuer": EXTERNAL_ISSUER,
    "single-replica": SINGLE,
    "long-name": LONG_NAME,
    "long-release": {},
    "monitoring-bare": MONITORING_BARE,
    "ebpf-agent": EBPF_AGENT,
}
# Values Helm must refuse, and a piece of its message.
REJECTED: dict[str, tuple[dict[str, Any], str]] = {
    "unknown-top-level-key": ({"replicas": 3}, "additional properties 'replicas' not allowed"),
    "unknown-nested-key": ({"webhook": {"failurepolicy": "Fail"}}, "additional properties 'failurepolicy' not allowed"),
    "typo-in-podmonitor": ({"podMonitor": {"honorLabels": False}}, "additional properties 'honorLabels' not allowed"),
    "bad-failure-policy": ({"webhook": {"failurePolicy": "Sometimes"}}, "value must be one of 'Ignore', 'Fail'"),
    "timeout-above-30s": ({"webhook": {"timeoutSeconds": 31}}, "timeoutSeconds"),
    "no-team-label": ({"attribution": {"teamLabels": []}}, "teamLabels"),
    "bad-llm-host": ({"injection": {"llmHosts": ["vllm.local"]}}, "llmHosts"),
    "pdb-blocks-drains": ({"operator": {"replicas": 1, "leaderElection": {"enabled": False}}},
                          "podDisruptionBudget.minAvailable must be below operator.replicas"),
    "two-leaderless-controllers": ({"operator": {"leaderElection": {"enabled": False}}},
                                   "operator.leaderElection.enabled=false needs operator.replicas=1"),
    "rotation-after-expiry": ({"operator": {"ca": {"validityDays": 30, "rotateBeforeDays": 30}}},
                              "rotateBeforeDays must be less than"),
    "kubernetes-1.28": ({}, "incompatible with Kubernetes v1.28"),
    "ring-not-power-of-two": ({"ebpfAgent": {"enabled": True, "ringBufferPages": 1000}}, "ringBufferPages"),
    "bad-llm-endpoint": ({"ebpfAgent": {"llmEndpoints": ["10.0.0.1"]}}, "llmEndpoints"),
    "agent-typo": ({"ebpfAgent": {"enable": True}}, "additional properties 'enable' not allowed"),
}
RELEASES = {"long-release": "r" * 53}  # Helm's longest release name
KUBE_VERSIONS = {"kubernetes-1.28": "1.28.9"}

CONTRACT_METRICS = {
    "podtally_llm_requests_total", "podtally_llm_tokens_total", "podtally_llm_cost_usd_total",
    "podtally_llm_request_duration_seconds", "podtally_llm_time_to_first_token_seconds",
    "podtally_llm_unmetered_connections_total",
}


# --- Helm -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cases = [{"id": case, "values": values} for case, values in RENDERS.items()]
    cases += [{"id": case, "values": values} for case, (values, _) in REJECTED.items()]
    for case in cases:
        case.update(release=RELEASES.get(case["id"], RELEASE), namespace=NAMESPACE,
                    kube_version=KUBE_VERSIONS.get(case["id"], K8S))
    request = {"chart": str(CHART), "lint": True, "renders": cases}
    return helm_engine.run(request, tmp_path_factory.mktemp("helm"))


def rendered(helm: Mapping[str, Any], case: str) -> list[dict[str, Any]]:
    result = helm["renders"][case]
    assert "error" not in result, result.get("error")
    return [doc for doc in yaml.safe_load_all(result["manifest"]) if doc]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def test_helm_is_the_real_engine(helm: Mapping[str, Any]) -> None:
    assert helm["helm"].startswith("helm-sdkpy-v")


def test_lint_is_clean(helm: Mapping[str, Any]) -> None:
    lint = helm["lint"]
    assert lint["TotalChartsLinted"] == 1
    assert lint["Errors"] is None
    # Severity 1 is INFO (only "icon is recommended"); 2 WARNING, 3 ERROR.
    assert [m for m in lint["Messages"] if m["Severity"] > 1] == []


@pytest.mark.parametrize("case", REJECTED)
def test_helm_refuses(helm: Mapping[str, Any], case: str) -> None:
    result = helm["renders"][case]
    assert "error" in result, f"{case} was accepted"
    assert REJECTED[case][1] in result["error"]


# --- every object is valid ----------------------------------------------------------------

def _closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": properties,
            "required": list(required)}


_STR = {"type": "string"}
_STRS = {"type": "array", "items": _STR}
_STR_MAP = {"type": "object", "additionalProperties": _STR}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_LABEL_SELECTOR = _closed({
    "matchLabels": _STR_MAP,
    "matchExpressions": {"type": "array", "items": _closed(
        {"key": _STR, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]}, "values": _STRS},
        ("key", "operator"))},
})
_RELABEL = _closed({
    "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
    "separator": _STR, "targetLabel": _STR, "regex": _STR, "modulus": {"type": "integer"}, "replacement": _STR,
    "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
                        "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
                        "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual",
                        "dropequal", "DropEqual"]},
})


def _kind(spec: dict[str, Any]) -> dict[str, Any]:
    return _closed({"apiVersion": _STR, "kind": _STR, "metadata": {"type": "object"}, "spec": spec},
                   ("apiVersion", "kind", "metadata", "spec"))


# The fields of these CRDs (monitoring.coreos.com/v1, cert-manager.io/v1) that the chart can
# render, closed: a misspelt or misplaced field fails here as it would be pruned or refused
# by the API server.
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "PodMonitor"): _kind(_closed({
        "namespaceSelector": _closed({"any": {"type": "boolean"}, "matchNames": _STRS}),
        "selector": _LABEL_SELECTOR,
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _closed({
            "port": _STR, "path": _STR, "honorLabels": {"type": "boolean"},
            "interval": _DURATION, "scrapeTimeout": _DURATION,
            "relabelings": {"type": "array", "items": _RELABEL},
            "metricRelabelings": {"type": "array", "items": _RELABEL},
        })},
    }, ("selector",))),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _kind(_closed({
        "groups": {"type": "array", "items": _closed({
            "name": {"type": "string", "minLength": 1}, "interval": _DURATION,
            "rules": {"type": "array", "items": {"oneOf": [
                _closed({"record": _STR, "expr": _STR, "labels": _STR_MAP}, ("record", "expr")),
                _closed({"alert": _STR, "expr": _STR, "for": _DURATION, "labels": _STR_MAP,
                         "annotations": _STR_MAP}, ("alert", "expr")),
            ]}},
        }, ("name",))},
    })),
    ("cert-manager.io/v1", "Certificate"): _kind(_closed({
        "secretName": _STR,
        "secretTemplate": _closed({"labels": _STR_MAP, "annotations": _STR_MAP}),
        "commonName": {"type": "string", "maxLength": 64},
        "dnsNames": _STRS,
        "duration": _STR, "renewBefore": _STR,
        "privateKey": _closed({"algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                               "size": {"type": "integer"},
                               "rotationPolicy": {"enum": ["Never", "Always"]}}),
        "usages": {"type": "array", "items": {"enum": ["server auth", "client auth", "digital signature",
                                                       "key encipherment"]}},
        "issuerRef": _closed({"name": _STR, "kind": _STR, "group": _STR}, ("name",)),
    }, ("secretName", "issuerRef"))),
    ("cert-manager.io/v1", "Issuer"): _kind(_closed({"selfSigned": _closed({})})),
}


def validate(doc: dict[str, Any]) -> None:
    schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if schema is None:
        kubernetes_validate.validate(doc, K8S, strict=True)
        return
    jsonschema.Draft202012Validator(schema).validate(doc)
    # Metadata is plain ObjectMeta: check it with the real schema, carried by a ConfigMap.
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
                                 K8S, strict=True)


@pytest.mark.parametrize("case", RENDERS)
def test_every_object_is_valid(helm: Mapping[str, Any], case: str) -> None:
    docs = rendered(helm, case)
    for doc in docs:
        validate(doc)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("case", RENDERS)
def test_helm_created_every_object(helm: Mapping[str, Any], case: str) -> None:
    created = {(o["object"]["kind"], o["name"]) for o in helm["renders"][case]["objects"]}
    assert {(d["kind"], d["metadata"]["name"]) for d in rendered(helm, case)} == created


def test_default_objects(helm: Mapping[str, Any]) -> None:
    kinds = sorted(d["kind"] for d in rendered(helm, "default"))
    assert kinds == sorted(["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                            "ConfigMap", "Deployment", "Service", "MutatingWebhookConfiguration",
                            "PodDisruptionBudget"])
    for doc in rendered(helm, "default"):
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"):
            assert doc["metadata"]["namespace"] == NAMESPACE


def test_all_optional_objects(helm: Mapping[str, Any]) -> None:
    kinds = {d["kind"] for d in rendered(helm, "all-on")}
    assert {"PodMonitor", "PrometheusRule", "Certificate", "Issuer"} <= kinds


@pytest.mark.parametrize("case", ["long-name", "long-release"])
def test_names_fit_in_63_characters(helm: Mapping[str, Any], case: str) -> None:
    docs = rendered(helm, case)
    service = one(docs, "Service")
    assert len(service["metadata"]["name"]) == {"long-name": 63, "long-release": 53 + len("-podtally")}[case]
    for doc in docs:
        for key, value in doc["metadata"]["labels"].items():
            assert len(value) <= 63, (key, value)
    assert one(docs, "MutatingWebhookConfiguration")["metadata"]["name"] == service["metadata"]["name"]


# --- the webhook ---------------------------------------------------------------------------

def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels AND matchExpressions)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for req in selector.get("matchExpressions") or []:
        present, value = req["key"] in labels, labels.get(req["key"])
        ok = {"In": present and value in req.get("values", []),
              "NotIn": not present or value not in req.get("values", []),
              "Exists": present, "DoesNotExist": not present}[req["operator"]]
        if not ok:
            return False
    return True


def webhooks_called(mwc: Mapping[str, Any], namespace: str, ns_labels: Mapping[str, str],
                    pod_labels: Mapping[str, str]) -> list[str]:
    ns_labels = {**ns_labels, "kubernetes.io/metadata.name": namespace}
    return [w["name"] for w in mwc["webhooks"]
            if selects(w.get("namespaceSelector", {}), ns_labels)
            and selects(w.get("objectSelector", {}), pod_labels)]


OPTED_IN = {"podtally.io/inject": "enabled"}
# (namespace, its labels, pod labels) -> the webhook the API server calls, if any.
ADMISSION = [
    ("shop", OPTED_IN, {}, "namespace.inject.podtally.io"),
    ("shop", OPTED_IN, {"podtally.io/inject": "true"}, "namespace.inject.podtally.io"),
    ("shop", OPTED_IN, {"podtally.io/inject": "false"}, None),
    ("plain", {}, {}, None),
    ("plain", {}, {"podtally.io/inject": "true"}, "object.inject.podtally.io"),
    ("plain", {}, {"podtally.io/inject": "false"}, None),
    ("plain", {"podtally.io/inject": "disabled"}, {"podtally.io/inject": "true"}, "object.inject.podtally.io"),
    ("kube-system", OPTED_IN, {"podtally.io/inject": "true"}, None),
    ("kube-public", {}, {"podtally.io/inject": "true"}, None),
    (NAMESPACE, OPTED_IN, {"podtally.io/inject": "true"}, None),
]


@pytest.mark.parametrize(("namespace", "ns_labels", "pod_labels", "expected"), ADMISSION)
def test_webhook_selectors(helm: Mapping[str, Any], namespace: str, ns_labels: dict[str, str],
                           pod_labels: dict[str, str], expected: str | None) -> None:
    """Which pods reach the webhook: at most one entry each, and exactly those the operator's
    own decision function would inject."""
    mwc = one(rendered(helm, "default"), "MutatingWebhookConfiguration")
    called = webhooks_called(mwc, namespace, ns_labels, pod_labels)
    assert called == ([expected] if expected else [])
    pod = {"metadata": {"labels": pod_labels}, "spec": {"containers": [{"name": "app", "image": "app"}]}}
    assert decide(pod, namespace, ns_labels, operator_namespace=NAMESPACE).inject == bool(called)


def test_webhook_configuration(helm: Mapping[str, Any]) -> None:
    docs = rendered(helm, "default")
    mwc = one(docs, "MutatingWebhookConfiguration")
    service = one(docs, "Service")
    assert "annotations" not in mwc["metadata"]  # no cert-manager: the operator sets caBundle
    assert [w["name"] for w in mwc["webhooks"]] == ["namespace.inject.podtally.io", "object.inject.podtally.io"]
    for hook in mwc["webhooks"]:
        assert hook["failurePolicy"] == "Ignore"
        assert hook["sideEffects"] == "None"
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["matchPolicy"] == "Equivalent"
        assert hook["timeoutSeconds"] == 5
        assert hook["reinvocationPolicy"] == "Never"
        assert hook["rules"] == [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                                  "resources": ["pods"], "scope": "Namespaced"}]
        assert "caBundle" not in hook["clientConfig"]
        assert hook["clientConfig"]["service"] == {"name": service["metadata"]["name"], "namespace": NAMESPACE,
                                                   "path": "/inject", "port": 443}
        excluded = hook["namespaceSelector"]["matchExpressions"][0]
        assert excluded == {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                            "values": ["kube-system", "kube-public", NAMESPACE]}
    opt_in = mwc["webhooks"][0]
    assert opt_in["namespaceSelector"]["matchLabels"] == {"podtally.io/inject": "enabled"}
    assert opt_in["objectSelector"] == {"matchExpressions": [
        {"key": "podtally.io/inject", "operator": "NotIn", "values": ["false"]}]}


def test_webhook_options(helm: Mapping[str, Any]) -> None:
    mwc = one(rendered(helm, "all-on"), "MutatingWebhookConfiguration")
    opt_in = mwc["webhooks"][0]
    assert opt_in["reinvocationPolicy"] == "IfNeeded"
    assert opt_in["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
         "values": ["kube-system", "kube-public", "monitoring", NAMESPACE]},
        {"key": "tier", "operator": "NotIn", "values": ["system"]},
    ]
    single = one(rendered(helm, "single-replica"), "MutatingWebhookConfiguration")
    assert [w["name"] for w in single["webhooks"]] == ["namespace.inject.podtally.io"]


def test_service_reaches_the_webhook(helm: Mapping[str, Any]) -> None:
    docs = rendered(helm, "default")
    service, deployment = one(docs, "Service"), one(docs, "Deployment")
    pod = deployment["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert ports == {"webhook": 9443, "metrics": 9090}
    assert {p["port"]: p["targetPort"] for p in service["spec"]["ports"]} == {443: "webhook", 9090: "metrics"}
    assert selects({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert "app.kubernetes.io/version" not in service["spec"]["selector"]  # selectors stay immutable


# --- the operator ---------------------------------------------------------------------------

def operator_args(deployment: Mapping[str, Any]) -> dict[str, str | bool]:
    args: dict[str, str | bool] = {}
    for arg in deployment["spec"]["template"]["spec"]["containers"][0]["args"]:
        key, _, value = arg.partition("=")
        args[key] = value or True
    return args


def test_operator_deployment(helm: Mapping[str, Any]) -> None:
    docs = rendered(helm, "default")
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert deployment["spec"]["replicas"] == 2
    assert container["image"] == "ghcr.io/podtally/podtally-operator:0.1.0"
    assert container["command"] == ["podtally", "operator"]
    lease = one(docs, "Role")["rules"][1]["resourceNames"][0]
    assert operator_args(deployment) == {
        "--webhook-port": "9443", "--metrics-port": "9090",
        "--webhook-service": one(docs, "Service")["metadata"]["name"],
        "--webhook-config": one(docs, "MutatingWebhookConfiguration")["metadata"]["name"],
        "--cert-dir": "/tmp/podtally-webhook",
        "--injection-config": "/etc/podtally/injection/config.yaml",
        "--injection-template": "/etc/podtally/injection/template.yaml",
        "--leader-election": True, "--lease-name": lease,
        "--ca-validity-days": "365", "--ca-rotate-before-days": "30", "--resync-seconds": "60",
    }
    assert container["env"][0] == {"name": "POD_NAMESPACE",
                                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
    probes = {name: (container[name]["httpGet"]["path"], container[name]["httpGet"]["port"])
              for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes == {"startupProbe": ("/healthz", "metrics"), "livenessProbe": ("/healthz", "metrics"),
                      "readinessProbe": ("/readyz", "metrics")}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes[mounts["/etc/podtally/injection"]]["configMap"]["name"] == f"{RELEASE}-injection"
    assert "emptyDir" in volumes[mounts["/tmp"]]  # --cert-dir is under it
    spread = pod["spec"]["topologySpreadConstraints"]
    assert spread == [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
                       "labelSelector": {"matchLabels": deployment["spec"]["selector"]["matchLabels"]}}]
    assert re.fullmatch(r"[0-9a-f]{64}", pod["metadata"]["annotations"]["checksum/injection"])
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": 1, "selector": deployment["spec"]["selector"]}


def test_operator_options(helm: Mapping[str, Any]) -> None:
    deployment = one(rendered(helm, "all-on"), "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert spec["tolerations"] == ALL_ON["operator"]["tolerations"]
    assert spec["affinity"] == ALL_ON["operator"]["affinity"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert [c.get("labelSelector") for c in spec["topologySpreadConstraints"]] == [
        {"matchLabels": selector}, {"matchLabels": {"app.kubernetes.io/name": "podtally"}}]
    single = one(rendered(helm, "single-replica"), "Deployment")
    assert single["spec"]["replicas"] == 1
    args = operator_args(single)
    assert args["--no-leader-election"] is True and "--leader-election" not in args
    assert not any(d["kind"] == "PodDisruptionBudget" for d in rendered(helm, "single-replica"))


def test_operator_cli_accepts_the_args(helm: Mapping[str, Any], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The args parse with the real `podtally operator` command (without running it)."""
    from podtally.cli import main

    command = getattr(main, "commands", {}).get("operator")
    assert command is not None, "`podtally operator` is missing from the CLI"
    monkeypatch.setenv("POD_NAMESPACE", NAMESPACE)
    for case in ("default", "all-on", "single-replica"):
        docs = rendered(helm, case)
        configmap = one(docs, "ConfigMap", f"{RELEASE}-injection")
        for key, text in configmap["data"].items():
            (tmp_path / key).write_text(text)
        (tmp_path / "certs").mkdir(exist_ok=True)
        args = [a.replace("/etc/podtally/injection", str(tmp_path)).replace("/tmp/podtally-webhook", str(tmp_path / "certs"))
                for a in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]]
        with command.make_context("operator", args) as ctx:
            assert ctx.params


def test_rbac(helm: Mapping[str, Any]) -> None:
    docs = rendered(helm, "default")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): (set(r["verbs"]), r.get("resourceNames"))
             for r in one(docs, "ClusterRole")["rules"]}
    mwc = one(docs, "MutatingWebhookConfiguration")["metadata"]["name"]
    assert rules == {
        (("",), ("namespaces",)): ({"get", "list", "watch"}, None),
        (("",), ("pods",)): ({"get", "list", "watch"}, None),
        (("apps",), ("replicasets",)): ({"get"}, None),
        (("batch",), ("jobs",)): ({"get"}, None),
        (("",), ("secrets", "configmaps")): ({"get", "list", "watch", "create", "update", "patch", "delete"}, None),
        (("admissionregistration.k8s.io",), ("mutatingwebhookconfigurations",)): ({"get", "patch", "update"}, [mwc]),
        (("", "events.k8s.io"), ("events",)): ({"create"}, None),
    }
    role = one(docs, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert [(r["resources"], sorted(r["verbs"]), r.get("resourceNames")) for r in role["rules"]] == [
        (["leases"], ["create"], None), (["leases"], ["get", "update"], [f"{RELEASE}-operator"])]
    account = one(docs, "ServiceAccount")["metadata"]["name"]
    for binding, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        bound = one(docs, binding)
        assert bound["roleRef"]["kind"] == role_kind
        assert bound["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == account
    assert "*" not in json.dumps([one(docs, "ClusterRole"), role])


def test_secure_defaults(helm: Mapping[str, Any]) -> None:
    pod = one(rendered(helm, "default"), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = pod["containers"][0]["securityContext"]
    assert context == {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                       "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    assert "hostNetwork" not in pod and "hostPID" not in pod


# --- the eBPF node agent ----------------------------------------------------------------------

def test_ebpf_agent_is_off_by_default(helm: Mapping[str, Any]) -> None:
    assert not [d for d in rendered(helm, "default") if "ebpf-agent" in d["metadata"]["name"]]


def test_ebpf_agent_daemonset(helm: Mapping[str, Any]) -> None:
    docs = rendered(helm, "ebpf-agent")
    name = f"{RELEASE}-ebpf-agent"
    ds = one(docs, "DaemonSet", name)
    pod = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "podtally", "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": "ebpf-agent"}
    assert pod["hostPID"] is True and "hostNetwork" not in pod
    assert pod["serviceAccountName"] == name
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert context["privileged"] is False and context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "PERFMON", "SYS_PTRACE",
                                                                "SYS_RESOURCE", "DAC_READ_SEARCH"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert {p: m.get("readOnly", False) for p, m in mounts.items()} == {
        "/sys": True, "/sys/kernel/tracing": True, "/lib/modules": True, "/usr/src": True,
        "/tmp": False}
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host == {"sys": "/sys", "tracing": "/sys/kernel/tracing", "modules": "/lib/modules",
                    "src": "/usr/src"}
    assert container["args"] == [
        "--metrics-port=15091", "--proxy-uid=1337", "--ringbuf-pages=256", "--max-connections=4096",
        "--cgroup=/sys/fs/cgroup/kubepods.slice", "--team-label=team",
        "--team-label=example.com/cost-center", "--llm-host=vllm.ml.svc.cluster.local=openai_compatible",
        "--llm-endpoint=10.96.40.0/24:8000=openai_compatible"]
    assert container["env"] == [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
    assert pod["tolerations"] == [{"operator": "Exists"}]
    role = one(docs, "ClusterRole", name)
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods", "namespaces"],
                              "verbs": ["get", "list", "watch"]}]
    binding = one(docs, "ClusterRoleBinding", name)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}]
    assert one(docs, "ServiceAccount", name)["metadata"]["namespace"] == NAMESPACE


def test_ebpf_agent_cli_accepts_the_args(helm: Mapping[str, Any]) -> None:
    """The args parse with the real `podtally ebpf-agent` command (without running it)."""
    from podtally.cli import main

    command = main.commands["ebpf-agent"]  # type: ignore[attr-defined]
    for case in ("ebpf-agent", "all-on"):
        (container,) = one(rendered(helm, case), "DaemonSet")["spec"]["template"]["spec"]["containers"]
        args = [a for a in container["args"] if not a.startswith("--cgroup=")]  # not a dir here
        with command.make_context("ebpf-agent", args) as ctx:
            assert ctx.params["metrics_port"] == 15091


# --- what gets injected ---------------------------------------------------------------------

def injection_config(helm: Mapping[str, Any], case: str) -> tuple[InjectionConfig, str]:
    data = one(rendered(helm, case), "ConfigMap", f"{RELEASE}-injection")["data"]
    return InjectionConfig.model_validate(yaml.safe_load(data["config.yaml"])), data["template.yaml"]


def test_injection_template_is_the_chart_file(helm: Mapping[str, Any]) -> None:
    chart_file = (CHART / "files" / "injection-template.yaml").read_text()
    _, template = injection_config(helm, "default")
    assert template == chart_file
    # ...and the same parts the operator renders from its packaged copy.
    assert chart_file == (ROOT / "src" / "podtally" / "injection" / "template.yaml").read_text()


def test_injection_config_is_the_operators_model(helm: Mapping[str, Any]) -> None:
    config, _ = injection_config(helm, "default")
    assert config == InjectionConfig()  # the chart's defaults are the operator's defaults
    config, _ = injection_config(helm, "all-on")
    assert config.native_sidecar is False
    assert config.team_labels == ("team", "example.com/cost-center")
    assert config.llm_hosts == ("vllm.ml.svc.cluster.local=openai_compatible",)
    assert config.exclude_cidrs == ("10.96.0.0/12",)
    assert config.drain_timeout == 12.5


@pytest.mark.parametrize("case", ["default", "all-on"])
def test_injected_pod_is_valid(helm: Mapping[str, Any], case: str, tmp_path: Path) -> None:
    """The operator renders the ConfigMap's template with the ConfigMap's settings, and a pod
    injected so is a valid Pod."""
    config, template = injection_config(helm, case)
    (tmp_path / "template.yaml").write_text(template)
    assert render_parts(config, "checkout", template_path=tmp_path / "template.yaml") == render_parts(config, "checkout")
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "checkout", "namespace": "shop", "labels": {"team": "payments"}},
           "spec": {"containers": [{"name": "app", "image": "python:3.11-slim"}]}}
    injected = inject_pod_spec(pod, config=config, workload="checkout", namespace_labels=OPTED_IN,
                               template_path=tmp_path / "template.yaml")
    kubernetes_validate.validate(injected, K8S, strict=True)
    sidecars = [c for c in injected["spec"]["initContainers"] + injected["spec"]["containers"]
                if c["name"] == "podtally-sidecar"]
    assert len(sidecars) == 1
    assert (sidecars[0].get("restartPolicy") == "Always") is config.native_sidecar
    ports = {p["name"]: p["containerPort"] for p in sidecars[0]["ports"]}
    assert ports == {"podtally-metrics": 15090}  # what the PodMonitor scrapes


# --- monitoring -----------------------------------------------------------------------------

def test_pod_monitor(helm: Mapping[str, Any]) -> None:
    docs = rendered(helm, "all-on")
    monitor = one(docs, "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    assert monitor["spec"]["selector"] == {}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["honorLabels"] is True  # the metric's namespace/team/workload win
    assert endpoint["port"] == "podtally-metrics"  # the injected sidecar's port name
    assert endpoint["path"] == "/metrics"
    assert {"sourceLabels": ["__meta_kubernetes_pod_container_name"], "regex": "podtally-sidecar",
            "action": "keep"} in endpoint["relabelings"]
    assert endpoint["metricRelabelings"] == ALL_ON["podMonitor"]["metricRelabelings"]


def rule_groups(helm: Mapping[str, Any]) -> dict[str, Any]:
    return {"groups": one(rendered(helm, "all-on"), "PrometheusRule")["spec"]["groups"]}


def test_prometheus_rules(helm: Mapping[str, Any]) -> None:
    groups = {g["name"]: g for g in rule_groups(helm)["groups"]}
    records = {r["record"]: r["expr"] for r in groups["podtally.recording"]["rules"]}
    assert records["podtally:llm_cost_usd:increase1h"] == (
        "sum by (namespace, team) (increase(podtally_llm_cost_usd_total[1h]))")
    assert records["podtally:llm_tokens:increase1h"] == (
        "sum by (namespace, team, token_type) (increase(podtally_llm_tokens_total[1h]))")
    alerts = [(r["alert"], r["labels"]["team"], r["labels"]["severity"]) for r in groups["podtally.budgets"]["rules"]]
    assert alerts == [
        ("PodtallyTeamBudgetExceeded", "payments", "critical"), ("PodtallyTeamBudgetNearlyExceeded", "payments", "warning"),
        ("PodtallyTeamBudgetExceeded", "research", "critical"), ("PodtallyTeamBudgetNearlyExceeded", "research", "warning"),
    ]
    assert all(r["labels"]["routing"] == "finops" for r in groups["podtally.budgets"]["rules"])
    assert not any(d["kind"] == "PrometheusRule" for d in rendered(helm, "default"))
    bare = one(rendered(helm, "monitoring-bare"), "PrometheusRule")["spec"]["groups"]
    assert [r["alert"] for r in bare[1]["rules"]] == ["PodtallyTeamBudgetExceeded"]
    (endpoint,) = one(rendered(helm, "monitoring-bare"), "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert endpoint == {"port": "podtally-metrics", "path": "/metrics", "honorLabels": True}


def promtool(*args: str) -> str:
    assert PROMTOOL is not None
    proc = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


ID = 'workload="{w}",app="{w}",service_account="default",provider="openai",model="gpt-4o-mini-2024-07-18"'
FIRING = 'ALERTS{{alertname="{a}",alertstate="firing",severity="{s}",team="{t}",routing="finops"}}'


def test_prometheus_rules_evaluate(helm: Mapping[str, Any], tmp_path: Path) -> None:
    """promtool checks the rules (PromQL and annotation templates), then runs them on synthetic
    series in Prometheus' engine: payments spends $2/h (budget 500: warned from ~200 h, over
    from ~250 h), research $1/h (budget 2000: never)."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_groups(helm)))
    promtool("check", "rules", str(tmp_path / "rules.yaml"))
    payments = ID.format(w="checkout") + ',namespace="shop",team="payments"'
    research = ID.format(w="trainer") + ',namespace="ml",team="research"'
    exceeded = FIRING.format(a="PodtallyTeamBudgetExceeded", s="critical", t="payments")
    nearly = FIRING.format(a="PodtallyTeamBudgetNearlyExceeded", s="warning", t="payments")
    # The alerts fire on the spend over the window, the sum of hourly increases; Prometheus 2
    # counts both ends of a subquery's range, 3 only the last, so the totals differ by one
    # hour ($2) between versions: the thresholds are checked with margin, not to the dollar.
    spend = 'sum(sum_over_time(podtally:llm_cost_usd:increase1h{team="payments"}[30d:1h]))'
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1h",
        "tests": [{
            "interval": "15m",
            "input_series": [
                {"series": f"podtally_llm_cost_usd_total{{{payments}}}", "values": "0+0.5x3000"},
                {"series": f"podtally_llm_cost_usd_total{{{research}}}", "values": "0+0.25x3000"},
                {"series": f'podtally_llm_tokens_total{{{payments},token_type="input"}}', "values": "0+250x3000"},
                {"series": f'podtally_llm_tokens_total{{{payments},token_type="output"}}', "values": "0+25x3000"},
            ],
            "promql_expr_test": [
                {"expr": "round(podtally:llm_cost_usd:increase1h)", "eval_time": "2h", "exp_samples": [
                    {"labels": '{namespace="shop",team="payments"}', "value": 2},
                    {"labels": '{namespace="ml",team="research"}', "value": 1}]},
                {"expr": "round(podtally:llm_tokens:increase1h)", "eval_time": "2h", "exp_samples": [
                    {"labels": '{namespace="shop",team="payments",token_type="input"}', "value": 1000},
                    {"labels": '{namespace="shop",team="payments",token_type="output"}', "value": 100}]},
                {"expr": f"({spend} > bool 1430) * ({spend} < bool 1450)", "eval_time": "31d",
                 "exp_samples": [{"labels": "{}", "value": 1}]},
                {"expr": 'ALERTS{alertstate="firing"}', "eval_time": "5d", "exp_samples": []},
                {"expr": 'ALERTS{alertstate="firing"}', "eval_time": "228h",
                 "exp_samples": [{"labels": nearly, "value": 1}]},
                {"expr": 'ALERTS{alertstate="firing"}', "eval_time": "31d",
                 "exp_samples": [{"labels": exceeded, "value": 1}, {"labels": nearly, "value": 1}]},
            ],
        }],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    promtool("test", "rules", str(tmp_path / "tests.yaml"))


def dashboard(helm: Mapping[str, Any]) -> dict[str, Any]:
    configmap = one(rendered(helm, "all-on"), "ConfigMap", f"{RELEASE}-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    text = configmap["data"]["podtally.json"]
    assert text == (CHART / "files" / "dashboards" / "podtally.json").read_text()
    board: dict[str, Any] = json.loads(text)
    return board


def dashboard_queries(board: Mapping[str, Any]) -> dict[str, list[str]]:
    return {p["title"]: [t["expr"] for t in p["targets"]] for p in board["panels"]}


def test_grafana_dashboard(helm: Mapping[str, Any]) -> None:
    queries = dashboard_queries(dashboard(helm))
    assert set(queries) >= {"Cost by team", "Tokens by type", "Requests by code",
                            "p95 request latency by model", "p95 time to first token by model"}
    assert "by (team)" in queries["Cost by team"][0]
    assert "by (token_type)" in queries["Tokens by type"][0]
    assert "by (code)" in queries["Requests by code"][0]
    assert queries["p95 request latency by model"][0].startswith("histogram_quantile(0.95,")
    assert "podtally_llm_time_to_first_token_seconds_bucket" in queries["p95 time to first token by model"][0]
    unmetered = queries["Unmetered LLM connections by workload (eBPF agent, top 10)"][0]
    assert "by (namespace, workload, provider)" in unmetered
    assert 'via="sidecar"' in queries["Metering coverage in range (eBPF agent)"][0]
    used = {re.sub(r"_bucket$", "", m) for q in sum(queries.values(), []) for m in re.findall(r"podtally_\w+", q)}
    assert used <= CONTRACT_METRICS | {"podtally_llm_connections_total"}


def test_grafana_queries_parse(helm: Mapping[str, Any], tmp_path: Path) -> None:
    """Every panel query is valid PromQL once Grafana's variables are filled in."""
    grafana = {"$__rate_interval": "5m", "$__range": "1d", "$namespace": ".*", "$team": ".*"}
    rules = []
    for n, expr in enumerate(sum(dashboard_queries(dashboard(helm)).values(), [])):
        for variable, value in grafana.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query{n}", "expr": expr})
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", str(tmp_path / "dashboard.yaml"))


def test_cert_manager(helm: Mapping[str, Any]) -> None:
    docs = rendered(helm, "all-on")
    service = one(docs, "Service")["metadata"]["name"]
    certificate, issuer = one(docs, "Certificate"), one(docs, "Issuer")
    assert f"{service}.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    assert certificate["spec"]["issuerRef"] == {"name": issuer["metadata"]["name"], "kind": "Issuer",
                                                "group": "cert-manager.io"}
    assert issuer["spec"] == {"selfSigned": {}}
    mwc = one(docs, "MutatingWebhookConfiguration")
    assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        f"{NAMESPACE}/{certificate['metadata']['name']}")
    deployment = one(docs, "Deployment")
    assert operator_args(deployment)["--cert-manager"] is True
    pod = deployment["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[operator_args(deployment)["--cert-dir"]])
    assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]

    external = rendered(helm, "external-issuer")
    assert not any(d["kind"] == "Issuer" for d in external)
    assert one(external, "Certificate")["spec"]["issuerRef"] == EXTERNAL_ISSUER["certManager"]["issuerRef"]
    assert "--cert-manager" not in operator_args(one(rendered(helm, "default"), "Deployment"))


def test_notes(helm: Mapping[str, Any]) -> None:
    notes = helm["renders"]["default"]["notes"]
    assert "kubectl label namespace NAMESPACE podtally.io/inject=enabled" in notes
    assert "podtally_llm_cost_usd_total" in notes
    assert len(notes.strip().splitlines()) <= 25


# --- values and their schema ----------------------------------------------------------------

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES_TEXT = (CHART / "values.yaml").read_text()


def schema_nodes(node: Any, path: str = "#") -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, child in node.items():
            found += schema_nodes(child, f"{path}/{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            found += schema_nodes(child, f"{path}/{i}")
    return found


def test_schema_is_closed() -> None:
    """Every object the schema describes field by field admits no other field; maps say what
    their values are; the few Kubernetes fragments passed through verbatim (affinity terms)
    are named here, and checked against the Kubernetes schema once rendered."""
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    opaque = []
    for path, node in schema_nodes(SCHEMA):
        if node.get("type") != "object" or path.endswith("/properties"):
            continue
        if "properties" in node:
            assert node.get("additionalProperties") is False, path
        elif "additionalProperties" not in node:
            opaque.append(path)
    assert sorted(opaque) == sorted([
        "#/properties/global",
        "#/definitions/affinity/properties/nodeAffinity/properties/requiredDuringSchedulingIgnoredDuringExecution",
        "#/definitions/affinity/properties/nodeAffinity/properties/preferredDuringSchedulingIgnoredDuringExecution/items",
        "#/definitions/podAffinity/properties/requiredDuringSchedulingIgnoredDuringExecution/items",
        "#/definitions/podAffinity/properties/preferredDuringSchedulingIgnoredDuringExecution/items",
    ])


def test_defaults_satisfy_the_schema() -> None:
    jsonschema.Draft7Validator(SCHEMA).validate(yaml.safe_load(VALUES_TEXT))


def value_keys() -> list[tuple[str, int]]:
    """(dotted key path, line index) of every mapping key in values.yaml, by indentation."""
    keys: list[tuple[str, int]] = []
    stack: list[tuple[int, str]] = []
    for n, line in enumerate(VALUES_TEXT.splitlines()):
        match = re.match(r"^( *)([A-Za-z_][\w.-]*|\"[^\"]+\"):", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        keys.append((".".join(k for _, k in stack), n))
    return keys


def leaf_paths(node: Mapping[str, Any], prefix: str = "") -> set[str]:
    """The chart's own values: where the schema stops describing them field by field (a $ref
    to a shared type, a list, a scalar, a map) is one value."""
    paths = set()
    for key, child in node.get("properties", {}).items():
        path = f"{prefix}{key}"
        if "$ref" not in child and child.get("type") == "object" and "properties" in child:
            paths |= leaf_paths(child, f"{path}.")
        else:
            paths.add(path)
    return paths


def test_every_value_is_commented() -> None:
    lines = VALUES_TEXT.splitlines()
    leaves = leaf_paths(SCHEMA) - {"global"}
    keys = dict(value_keys())
    assert leaves <= set(keys), f"no default in values.yaml: {sorted(leaves - set(keys))}"
    for path in sorted(leaves):
        above = lines[keys[path] - 1].strip()
        assert above.startswith("#"), f"{path} has no comment"
