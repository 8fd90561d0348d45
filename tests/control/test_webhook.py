"""The admission webhook over real HTTPS: AdmissionReview v1 in, a JSON patch out that turns
the pod into a valid injected pod; every internal failure admits the pod unchanged."""

from __future__ import annotations

import base64
import copy
import http.client
import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
from prometheus_client import CollectorRegistry
from support.kube_emulator import RunningEmulator

from podtally import certs
from podtally.control.kube import Kube
from podtally.control.metrics import OperatorMetrics
from podtally.control.webhook import Admission, NamespaceLabels, WebhookServer, kube_owner_lookup
from podtally.injection.decide import STATUS_ANNOTATION
from podtally.injection.render import InjectionConfig

DATA = Path(__file__).parent / "testdata"
K8S = "1.30.0"
SERVICE_NAME = "podtally-webhook.podtally-system.svc"
UID = "705ab4f5-6393-11e8-b7cc-42010a800002"


def review_request() -> dict[str, Any]:
    return json.loads((DATA / "admission-review-pod-create.json").read_text())


def drop_nulls(obj: Any) -> Any:
    """The API server never stores nulls (the request carries `creationTimestamp: null`)."""
    if isinstance(obj, dict):
        return {k: drop_nulls(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [drop_nulls(v) for v in obj]
    return obj


class Webhook:
    def __init__(self, server: WebhookServer, ca: bytes, cert_dir: Path,
                 metrics: OperatorMetrics) -> None:
        self.server, self.ca, self.cert_dir, self.metrics = server, ca, cert_dir, metrics

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.ca.decode())
        return ctx

    def connect(self) -> http.client.HTTPSConnection:
        """Like the API server: to the Service's DNS name, verified against caBundle."""
        conn = http.client.HTTPSConnection(SERVICE_NAME, self.server.port, timeout=10)
        raw = socket.create_connection(("127.0.0.1", self.server.port), timeout=10)
        conn.sock = self.context().wrap_socket(raw, server_hostname=SERVICE_NAME)
        return conn

    def post(self, body: bytes, path: str = "/inject",
             headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        conn = self.connect()
        try:
            conn.request("POST", path, body=body,
                         headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def review(self, request_review: Mapping[str, Any]) -> dict[str, Any]:
        status, body = self.post(json.dumps(request_review).encode())
        assert status == 200, body
        out: dict[str, Any] = json.loads(body)
        assert out["apiVersion"] == "admission.k8s.io/v1" and out["kind"] == "AdmissionReview"
        return out["response"]

    def count(self, result: str, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "podtally_operator_injections_total", {"result": result, "reason": reason})
        return value or 0.0


def write_serving_cert(cert_dir: Path, ca: tuple[bytes, bytes], cn: str = SERVICE_NAME) -> None:
    cert, key = certs.issue_server_cert(*ca, [cn, "localhost"], ["127.0.0.1"], valid_days=30)
    cert_dir.mkdir(exist_ok=True)
    (cert_dir / "tls.key").write_bytes(key)
    (cert_dir / "tls.crt").write_bytes(cert)


def start_webhook(tmp_path: Path, *, namespace_labels: Callable[[str], Mapping[str, str]],
                  lookup: Any = None) -> Iterator[Webhook]:
    ca = certs.generate_ca("test webhook CA", valid_days=30)
    cert_dir = tmp_path / "certs"
    write_serving_cert(cert_dir, ca)
    metrics = OperatorMetrics(CollectorRegistry())
    admission = Admission(config=InjectionConfig(image="podtally:test"),
                          operator_namespace="podtally-system",
                          namespace_labels=namespace_labels, lookup=lookup, metrics=metrics)
    server = WebhookServer(host="127.0.0.1", port=0, cert_dir=cert_dir, admission=admission)
    server.start()
    assert server.wait_ready(10)
    try:
        yield Webhook(server, ca[0], cert_dir, metrics)
    finally:
        server.stop()


@pytest.fixture
def webhook(tmp_path: Path, emulator: RunningEmulator, kube: Kube) -> Iterator[Webhook]:
    """The webhook wired as `podtally operator` wires it, against the emulated API server:
    namespace shop (opted in, team payments), the Deployment's ReplicaSet."""
    emulator.namespace("shop", {"podtally.io/inject": "enabled", "team": "payments"})
    emulator.namespace("plain")
    emulator.create({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": "nginx-deployment-7d9f8c6b5", "namespace": "shop",
                     "uid": "d9607e19-f88f-11e6-a518-42010a800195",
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                          "name": "nginx-deployment", "controller": True,
                                          "uid": "8a3b1e0e-f88f-11e6-a518-42010a800195"}]},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "nginx"}},
                 "template": {"metadata": {"labels": {"app": "nginx"}},
                              "spec": {"containers": [{"name": "nginx",
                                                       "image": "nginx:1.14.2"}]}}}})
    quick = kube.with_timeout(2.0)
    yield from start_webhook(tmp_path, namespace_labels=NamespaceLabels(quick.get_namespace),
                             lookup=kube_owner_lookup(quick))


def test_deployment_pod_is_injected_and_valid(webhook: Webhook, emulator: RunningEmulator) -> None:
    request = review_request()
    pod = request["request"]["object"]
    resp = webhook.review(request)
    assert resp["uid"] == UID and resp["allowed"] is True and resp["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(resp["patch"]))
    mutated = jsonpatch.apply_patch(copy.deepcopy(pod), patch)
    kubernetes_validate.validate(drop_nulls(mutated), K8S, strict=True)

    names = [c["name"] for c in mutated["spec"]["initContainers"]]
    assert names == ["podtally-init", "podtally-sidecar"]
    sidecar = mutated["spec"]["initContainers"][1]
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    # The pod has no pod-template-hash: only the API server knows the Deployment.
    assert env["PODTALLY_WORKLOAD"] == "nginx-deployment"
    assert ("GET", "/apis/apps/v1/namespaces/shop/replicasets/nginx-deployment-7d9f8c6b5") \
        in emulator.requests()
    assert mutated["metadata"]["labels"]["team"] == "payments"  # copied from the namespace
    assert STATUS_ANNOTATION in mutated["metadata"]["annotations"]
    # The app's own service-account mount is kept, the trust bundle added.
    app = mutated["spec"]["containers"][0]
    assert [m["name"] for m in app["volumeMounts"]] == ["kube-api-access-8x2lq", "podtally-trust"]
    assert webhook.count("injected", "namespace") == 1


def test_injected_pod_is_left_alone(webhook: Webhook) -> None:
    request = review_request()
    pod = request["request"]["object"]
    first = webhook.review(request)
    request["request"]["object"] = jsonpatch.apply_patch(
        pod, json.loads(base64.b64decode(first["patch"])))
    again = webhook.review(request)
    assert again == {"uid": UID, "allowed": True}
    assert webhook.count("skipped", "already-injected") == 1


@pytest.mark.parametrize(
    ("namespace", "change", "reason"),
    [
        pytest.param("plain", {}, "namespace-not-enabled", id="namespace-not-opted-in"),
        pytest.param("shop", {"labels": {"app": "nginx", "podtally.io/inject": "false"}},
                     "pod-opt-out", id="pod-opt-out"),
        pytest.param("podtally-system", {}, "excluded-namespace", id="operator-namespace"),
        pytest.param("kube-system", {}, "excluded-namespace", id="kube-system"),
    ],
)
def test_pods_not_to_inject_are_admitted_unchanged(
    webhook: Webhook, namespace: str, change: dict[str, Any], reason: str
) -> None:
    request = review_request()
    request["request"]["namespace"] = namespace
    request["request"]["object"]["metadata"].update(namespace=namespace, **change)
    assert webhook.review(request) == {"uid": UID, "allowed": True}
    assert webhook.count("skipped", reason) == 1


def test_host_network_pod_is_admitted_unchanged(webhook: Webhook) -> None:
    request = review_request()
    request["request"]["object"]["spec"]["hostNetwork"] = True
    assert webhook.review(request) == {"uid": UID, "allowed": True}
    assert webhook.count("skipped", "host-network") == 1


def test_other_operations_pass(webhook: Webhook) -> None:
    request = review_request()
    request["request"]["operation"] = "UPDATE"
    request["request"]["oldObject"] = request["request"]["object"]
    assert webhook.review(request) == {"uid": UID, "allowed": True}
    assert webhook.count("skipped", "not-a-pod-create") == 1


def test_namespace_lookup_failure_fails_open(tmp_path: Path) -> None:
    """The API server is gone: the pod is admitted unchanged and the error counted."""
    dead = Kube.for_host("http://127.0.0.1:9", timeout=1.0)  # discard port: refused
    for hook in start_webhook(tmp_path, namespace_labels=NamespaceLabels(dead.get_namespace),
                              lookup=kube_owner_lookup(dead)):
        assert hook.review(review_request()) == {"uid": UID, "allowed": True}
        assert hook.count("error", "internal") == 1


def test_internal_error_fails_open(tmp_path: Path) -> None:
    def broken(namespace: str) -> Mapping[str, str]:
        raise RuntimeError("bug")

    for hook in start_webhook(tmp_path, namespace_labels=broken):
        assert hook.review(review_request()) == {"uid": UID, "allowed": True}
        assert hook.count("error", "internal") == 1


def test_bad_requests(tmp_path: Path) -> None:
    for hook in start_webhook(tmp_path, namespace_labels=lambda ns: {}):
        status, _ = hook.post(b"{not json")
        assert status == 400
        status, _ = hook.post(b'{"kind": "AdmissionReview"}')
        assert status == 400
        assert hook.count("error", "bad-request") == 2
        status, _ = hook.post(b"{}", path="/mutate")
        assert status == 404
        # Bounded: refused on Content-Length alone, before reading the body.
        status, _ = hook.post(b"x", headers={"Content-Length": str(64 * 1024 * 1024)})
        assert status == 413
        assert hook.count("error", "too-large") == 1


def test_healthz_and_keep_alive(tmp_path: Path) -> None:
    for hook in start_webhook(tmp_path, namespace_labels=lambda ns: {}):
        conn = hook.connect()
        try:
            for _ in range(3):  # one connection, several requests: as the API server does
                conn.request("GET", "/healthz")
                resp = conn.getresponse()
                assert (resp.status, resp.read()) == (200, b"ok\n")
            conn.request("POST", "/inject", body=json.dumps(review_request()).encode())
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["response"]["allowed"]
        finally:
            conn.close()


def test_rotated_certificate_is_served_without_restart(tmp_path: Path) -> None:
    for hook in start_webhook(tmp_path, namespace_labels=lambda ns: {}):
        hook.server.reloader.interval = 0.0
        new_ca = certs.generate_ca("rotated webhook CA", valid_days=30)
        time.sleep(0.01)  # a new mtime
        write_serving_cert(hook.cert_dir, new_ca)
        hook.ca = new_ca[0]
        status, _ = hook.post(json.dumps(review_request()).encode())
        assert status == 200


def test_injection_template_from_a_file(tmp_path: Path) -> None:
    """The chart mounts its copy of the template; the webhook renders that one."""
    from importlib import resources

    packaged = resources.files("podtally.injection").joinpath("template.yaml").read_text()
    marker = "    - name: TMPDIR\n"
    assert marker in packaged
    custom = tmp_path / "template.yaml"
    custom.write_text(packaged.replace(
        marker, "    - name: FROM_CHART\n      value: \"yes\"\n" + marker))
    metrics = OperatorMetrics(CollectorRegistry())
    admission = Admission(config=InjectionConfig(), operator_namespace="podtally-system",
                          namespace_labels=lambda ns: {"podtally.io/inject": "enabled"},
                          lookup=None, metrics=metrics, template_path=custom)
    status, body = admission(json.dumps(review_request()).encode())
    assert status == 200
    patch = json.loads(base64.b64decode(json.loads(body)["response"]["patch"]))
    mutated = jsonpatch.apply_patch(review_request()["request"]["object"], patch)
    sidecar = mutated["spec"]["initContainers"][1]
    assert {"name": "FROM_CHART", "value": "yes"} in sidecar["env"]
