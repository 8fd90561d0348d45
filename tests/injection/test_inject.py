"""Golden injection: real manifests → injected manifests, every object schema-validated."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from podtally.cli import main
from podtally.injection.admission import review
from podtally.injection.decide import STATUS_ANNOTATION, decide
from podtally.injection.manifests import inject_documents
from podtally.injection.render import InjectionConfig
from podtally.injection.workload import resolve_workload

DATA = Path(__file__).parent / "testdata"
CASES = sorted(p.stem for p in DATA.glob("*.yaml") if not p.stem.endswith(".injected"))
NS_LABELS = {"podtally.io/inject": "enabled", "team": "payments"}
K8S = "1.30.0"  # native sidecars are GA from 1.29


def inject_cli(path: Path, *extra: str) -> str:
    result = CliRunner().invoke(main, ["inject", "-f", str(path), "--namespace", "shop",
                                       "--namespace-labels", "podtally.io/inject=enabled,team=payments",
                                       "--image", "podtally:test", *extra])
    assert result.exit_code == 0, result.output
    return result.output


def validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S, strict=True)


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str) -> None:
    out = inject_cli(DATA / f"{case}.yaml")
    golden = DATA / f"{case}.injected.yaml"
    if not golden.exists():  # a new case: write its golden file once, then review it
        golden.write_text(out)
    assert out == golden.read_text()
    for doc in yaml.safe_load_all(out):
        validate(doc)


@pytest.mark.parametrize("case", CASES)
def test_idempotent(case: str, tmp_path: Path) -> None:
    once = inject_cli(DATA / f"{case}.yaml")
    (tmp_path / "once.yaml").write_text(once)
    assert inject_cli(tmp_path / "once.yaml") == once


def _template(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "Pod":
        return doc
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]
    return doc["spec"]["template"]


def test_what_an_injected_pod_gets() -> None:
    (doc,) = yaml.safe_load_all(inject_cli(DATA / "deployment.yaml"))
    tpl = _template(doc)
    spec = tpl["spec"]
    init, sidecar = spec["initContainers"][:2]
    assert init["name"] == "podtally-init" and init["command"] == ["podtally", "init-iptables"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert sidecar["name"] == "podtally-sidecar" and sidecar["restartPolicy"] == "Always"
    assert sidecar["securityContext"]["runAsUser"] == 1337
    env = {e["name"]: e for e in sidecar["env"]}
    assert env["PODTALLY_WORKLOAD"]["value"] == "nginx-deployment"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    app = spec["containers"][0]
    app_env = {e["name"]: e["value"] for e in app["env"]}
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "AWS_CA_BUNDLE"):
        assert app_env[name] == "/etc/podtally/trust/ca-bundle.crt"
    assert tpl["metadata"]["labels"]["team"] == "payments"  # copied from the namespace
    assert STATUS_ANNOTATION in tpl["metadata"]["annotations"]


def test_app_values_are_never_overridden() -> None:
    (doc,) = yaml.safe_load_all(inject_cli(DATA / "pod-with-env.yaml"))
    spec = doc["spec"]
    app_env = {e["name"]: e["value"] for e in spec["containers"][0]["env"]}
    assert app_env["SSL_CERT_FILE"] == "/etc/app/ca.pem"
    assert doc["metadata"]["labels"]["team"] == "web-platform"  # the pod's own team wins
    names = [c["name"] for c in spec["initContainers"]]
    assert names == ["podtally-init", "podtally-sidecar", "fetch-config"]
    fetch = spec["initContainers"][2]
    assert any(e["name"] == "SSL_CERT_FILE" for e in fetch["env"])


def test_plain_sidecar_option() -> None:
    (doc,) = yaml.safe_load_all(inject_cli(DATA / "job.yaml", "--plain-sidecar"))
    spec = _template(doc)["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["podtally-init"]
    assert [c["name"] for c in spec["containers"]] == ["pi", "podtally-sidecar"]
    validate(doc)


def test_kube_system_daemonset_is_never_injected() -> None:
    src = yaml.safe_load((DATA / "daemonset.yaml").read_text())
    (doc,) = yaml.safe_load_all(inject_cli(DATA / "daemonset.yaml"))
    assert doc == src


@pytest.mark.parametrize(
    ("pod", "namespace", "ns_labels", "inject", "reason"),
    [
        ({"spec": {"hostNetwork": True}}, "shop", NS_LABELS, False, "host-network"),
        ({}, "kube-system", NS_LABELS, False, "excluded-namespace"),
        ({}, "kube-public", NS_LABELS, False, "excluded-namespace"),
        ({}, "podtally-system", NS_LABELS, False, "excluded-namespace"),
        ({}, "shop", NS_LABELS, True, "namespace"),
        ({}, "shop", {}, False, "namespace-not-enabled"),
        ({"metadata": {"labels": {"podtally.io/inject": "false"}}}, "shop", NS_LABELS, False, "pod-opt-out"),
        ({"metadata": {"annotations": {"podtally.io/inject": "false"}}}, "shop", NS_LABELS, False, "pod-opt-out"),
        ({"metadata": {"labels": {"podtally.io/inject": "true"}}}, "shop", {}, True, "pod-opt-in"),
        # the label wins over the annotation
        ({"metadata": {"labels": {"podtally.io/inject": "true"},
                       "annotations": {"podtally.io/inject": "false"}}}, "shop", {}, True, "pod-opt-in"),
        ({"metadata": {"annotations": {STATUS_ANNOTATION: "{}"}}}, "shop", NS_LABELS, False, "already-injected"),
        ({"metadata": {"labels": {"podtally.io/inject": "true"}}, "spec": {"hostNetwork": True}}, "shop", NS_LABELS, False, "host-network"),
    ],
)
def test_decide(pod: dict, namespace: str, ns_labels: dict, inject: bool, reason: str) -> None:
    d = decide(pod, namespace, ns_labels, operator_namespace="podtally-system")
    assert (d.inject, d.reason) == (inject, reason)


@pytest.mark.parametrize(
    ("meta", "lookup", "expected"),
    [
        ({"name": "web-7d9f8-abcde", "labels": {"pod-template-hash": "7d9f8"},
          "ownerReferences": [{"kind": "ReplicaSet", "name": "web-7d9f8", "controller": True}]},
         None, ("Deployment", "web")),
        ({"ownerReferences": [{"kind": "ReplicaSet", "name": "web-7d9f8", "controller": True}]},
         lambda k, ns, n: ("Deployment", "web-from-api"), ("Deployment", "web-from-api")),
        ({"ownerReferences": [{"kind": "Job", "name": "nightly-28925760", "controller": True}]},
         None, ("CronJob", "nightly")),
        ({"ownerReferences": [{"kind": "Job", "name": "pi", "controller": True}]},
         lambda k, ns, n: None, ("Job", "pi")),
        ({"ownerReferences": [{"kind": "StatefulSet", "name": "db", "controller": True}]}, None, ("StatefulSet", "db")),
        ({"ownerReferences": [{"kind": "DaemonSet", "name": "agent", "controller": True}]}, None, ("DaemonSet", "agent")),
        ({"name": "debug"}, None, ("Pod", "debug")),
    ],
)
def test_resolve_workload(meta: dict, lookup: Any, expected: tuple[str, str]) -> None:
    assert resolve_workload({"metadata": meta}, "shop", lookup) == expected


def _admission_request(pod: dict[str, Any], namespace: str = "shop") -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                        "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "resource": {"group": "", "version": "v1", "resource": "pods"},
                        "namespace": namespace, "operation": "CREATE", "object": pod}}


def test_admission_patch_applies_and_validates() -> None:
    dep = yaml.safe_load((DATA / "deployment.yaml").read_text())
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"generateName": "nginx-deployment-5c689d88bb-", "namespace": "shop",
                        "labels": {**dep["spec"]["template"]["metadata"]["labels"],
                                   "pod-template-hash": "5c689d88bb"},
                        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                             "name": "nginx-deployment-5c689d88bb",
                                             "uid": "d9607e19-f88f-11e6-a518-42010a800195",
                                             "controller": True, "blockOwnerDeletion": True}]},
           "spec": dep["spec"]["template"]["spec"]}
    out = review(_admission_request(pod), config=InjectionConfig(), namespace_labels=NS_LABELS,
                 operator_namespace="podtally-system")
    resp = out.response["response"]
    assert resp["allowed"] and resp["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    patch = json.loads(base64.b64decode(resp["patch"]))
    mutated = jsonpatch.apply_patch(pod, patch)
    validate(mutated)
    env = {e["name"]: e.get("value") for e in mutated["spec"]["initContainers"][1]["env"]}
    assert env["PODTALLY_WORKLOAD"] == "nginx-deployment"
    # Re-admitting the mutated pod changes nothing.
    again = review(_admission_request(mutated), config=InjectionConfig(), namespace_labels=NS_LABELS,
                   operator_namespace="podtally-system")
    assert "patch" not in again.response["response"] and again.decision.reason == "already-injected"


def test_admission_leaves_excluded_pods_alone() -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
           "spec": {"hostNetwork": True, "containers": [{"name": "a", "image": "a"}]}}
    out = review(_admission_request(pod), config=InjectionConfig(), namespace_labels=NS_LABELS,
                 operator_namespace="podtally-system")
    assert out.response["response"] == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True}


def test_inject_passes_other_kinds_through() -> None:
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}}
    assert inject_documents([svc], config=InjectionConfig(), default_namespace="shop",
                            namespace_labels=NS_LABELS, operator_namespace="podtally-system") == [svc]


def test_inject_bad_yaml_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [unclosed\n")
    result = CliRunner().invoke(main, ["inject", "-f", str(bad)])
    assert result.exit_code != 0 and "not valid YAML" in result.output


def test_rendered_init_args_are_what_the_cli_accepts() -> None:
    (doc,) = yaml.safe_load_all(inject_cli(DATA / "pod.yaml"))
    init = doc["spec"]["initContainers"][0]
    result = CliRunner().invoke(main, [*init["command"][1:], *init["args"], "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "--uid-owner 1337" in result.output
