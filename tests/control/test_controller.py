"""The controller against kmock's Kubernetes emulator: namespace CAs and trust bundles, their
rotation and removal, the webhook's certificate and caBundle, the gauges, leader election."""

from __future__ import annotations

import base64
import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry
from support.kube_emulator import RunningEmulator

from podtally import certs
from podtally.control import desired
from podtally.control.controller import Controller, ControllerSettings, load_system_cas
from podtally.control.desired import CaPolicy
from podtally.control.kube import Kube
from podtally.control.leader import LeaderElector
from podtally.control.metrics import OperatorMetrics

K8S = "1.30.0"
OPNS = "podtally-system"
ENABLED = {"podtally.io/inject": "enabled"}
MANAGED = {"app.kubernetes.io/managed-by": "podtally"}
SYSTEM_CAS = load_system_cas()


def validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S, strict=True)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(obj: dict[str, Any] | None, key: str) -> bytes:
    assert obj is not None
    return base64.b64decode(obj["data"][key])


def pem_certs(pem: bytes | str) -> list[bytes]:
    return desired.split_certs(pem.encode() if isinstance(pem, str) else pem)


@pytest.fixture
def settings(tmp_path: Path) -> ControllerSettings:
    return ControllerSettings(operator_namespace=OPNS, policy=CaPolicy.days(365, 30),
                              cert_dir=tmp_path / "webhook-certs", resync_seconds=30,
                              watch_timeout_seconds=2)


@pytest.fixture
def metrics() -> OperatorMetrics:
    return OperatorMetrics(CollectorRegistry())


@pytest.fixture
def controller(kube: Kube, settings: ControllerSettings,
               metrics: OperatorMetrics) -> Iterator[Controller]:
    ctl = Controller(kube, settings, metrics, system_cas=SYSTEM_CAS)
    yield ctl
    ctl.stop()


def writes(emulator: RunningEmulator) -> list[tuple[str, str]]:
    return [r for r in emulator.requests() if r[0] in ("POST", "PUT", "PATCH", "DELETE")]


def wait_for(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {check}")


# -- namespace CAs and trust bundles --------------------------------------------------


def test_opted_in_namespaces_get_a_ca_and_a_trust_bundle(
    emulator: RunningEmulator, controller: Controller, metrics: OperatorMetrics
) -> None:
    for ns in ("shop", "web", "kube-system", OPNS):
        emulator.namespace(ns, ENABLED)
    emulator.namespace("plain")
    controller.reconcile_namespaces()

    cas = {}
    for ns in ("shop", "web"):
        secret = emulator.stored("v1/secrets", ns, "podtally-ca")
        bundle = emulator.stored("v1/configmaps", ns, "podtally-trust-bundle")
        assert secret is not None and bundle is not None
        validate(secret)
        validate(bundle)
        assert secret["type"] == "kubernetes.io/tls"
        assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "podtally"
        cert, key = unb64(secret, "tls.crt"), unb64(secret, "tls.key")
        ca = certs.load_certificate(cert)
        assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert ns in ca.subject.rfc4514_string()
        # The pair the sidecar mints leaf certificates with.
        certs.issue_server_cert(cert, key, ["api.openai.com"])
        text = bundle["data"]["ca-bundle.crt"]
        assert text.startswith(SYSTEM_CAS.decode().rstrip("\n"))  # the system CAs, then ours
        assert pem_certs(text)[-1] == cert
        assert len(pem_certs(text)) == len(pem_certs(SYSTEM_CAS)) + 1
        cas[ns] = cert
    assert cas["shop"] != cas["web"]  # a CA per namespace
    for ns in ("plain", "kube-system", OPNS):  # not opted in, or never injected
        assert emulator.stored("v1/secrets", ns, "podtally-ca") is None
        assert emulator.stored("v1/configmaps", ns, "podtally-trust-bundle") is None
    assert metrics.registry.get_sample_value("podtally_operator_namespace_cas") == 2


def test_reconcile_is_idempotent(emulator: RunningEmulator, controller: Controller) -> None:
    emulator.namespace("shop", ENABLED)
    controller.reconcile_namespaces()
    before = writes(emulator)
    controller.reconcile_namespaces()
    assert writes(emulator) == before


def test_opting_out_removes_what_podtally_made(
    emulator: RunningEmulator, controller: Controller
) -> None:
    emulator.namespace("shop", ENABLED)
    controller.reconcile_namespaces()
    assert emulator.stored("v1/secrets", "shop", "podtally-ca") is not None
    emulator.label_namespace("shop", {"podtally.io/inject": None})
    controller.reconcile_namespaces()
    assert emulator.stored("v1/secrets", "shop", "podtally-ca") is None
    assert emulator.stored("v1/configmaps", "shop", "podtally-trust-bundle") is None


def test_a_ca_someone_brought_is_used_and_never_touched(
    emulator: RunningEmulator, controller: Controller
) -> None:
    cert, key = certs.generate_ca("corporate proxy CA", valid_days=20)  # inside the margin
    emulator.namespace("byo", ENABLED)
    theirs = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
              "metadata": {"name": "podtally-ca", "namespace": "byo"},
              "data": {"tls.crt": b64(cert), "tls.key": b64(key)}}
    emulator.create(theirs)
    controller.reconcile_namespaces()
    kept = emulator.stored("v1/secrets", "byo", "podtally-ca")
    assert kept is not None and kept["data"] == theirs["data"]  # not rotated
    bundle = emulator.stored("v1/configmaps", "byo", "podtally-trust-bundle")
    assert bundle is not None and pem_certs(bundle["data"]["ca-bundle.crt"])[-1] == cert
    emulator.label_namespace("byo", {"podtally.io/inject": "disabled"})
    controller.reconcile_namespaces()
    assert emulator.stored("v1/secrets", "byo", "podtally-ca") is not None
    assert emulator.stored("v1/configmaps", "byo", "podtally-trust-bundle") is None


def test_a_ca_near_expiry_is_rotated_and_the_old_one_stays_trusted(
    emulator: RunningEmulator, controller: Controller
) -> None:
    now = dt.datetime.now(dt.UTC)
    old_cert, old_key = certs.generate_ca("podtally CA for namespace shop", valid_days=365,
                                          now=now - dt.timedelta(days=345))  # 20 days left
    expired, _ = certs.generate_ca("older", valid_days=10, now=now - dt.timedelta(days=400))
    emulator.namespace("shop", ENABLED)
    emulator.create({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                     "metadata": {"name": "podtally-ca", "namespace": "shop", "labels": MANAGED},
                     "data": {"tls.crt": b64(old_cert), "tls.key": b64(old_key),
                              "previous.crt": b64(expired)}})
    controller.reconcile_namespaces()

    secret = emulator.stored("v1/secrets", "shop", "podtally-ca")
    validate(secret or {})
    new_cert = unb64(secret, "tls.crt")
    assert new_cert != old_cert
    assert certs.cert_not_after(new_cert) - now > dt.timedelta(days=364)
    assert pem_certs(unb64(secret, "previous.crt")) == [old_cert]  # the expired one dropped
    bundle = emulator.stored("v1/configmaps", "shop", "podtally-trust-bundle")
    assert bundle is not None
    ours = pem_certs(bundle["data"]["ca-bundle.crt"])[-2:]
    assert ours == [new_cert, old_cert]
    assert expired not in pem_certs(bundle["data"]["ca-bundle.crt"])


def test_namespace_events_wake_the_controller(
    emulator: RunningEmulator, controller: Controller
) -> None:
    emulator.namespace("shop")
    controller.start()  # resync 30 s: only the watch can be this quick
    wait_for(lambda: controller.passes >= 1)
    emulator.label_namespace("shop", ENABLED)
    wait_for(lambda: emulator.stored("v1/secrets", "shop", "podtally-ca"))
    emulator.label_namespace("shop", {"podtally.io/inject": None})
    wait_for(lambda: emulator.stored("v1/secrets", "shop", "podtally-ca") is None)
    emulator.namespace("later", ENABLED)
    wait_for(lambda: emulator.stored("v1/configmaps", "later", "podtally-trust-bundle"))


# -- the webhook's certificate --------------------------------------------------------


def webhook_configuration(*names: str) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "podtally"},
        "webhooks": [{
            "name": name, "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "failurePolicy": "Ignore", "reinvocationPolicy": "Never", "timeoutSeconds": 5,
            "clientConfig": {"service": {"name": "podtally-webhook", "namespace": OPNS,
                                         "path": "/inject", "port": 443}},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                       "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                 "values": ["kube-system", "kube-public", OPNS]}]},
        } for name in names],
    }


def test_self_managed_webhook_certificate_and_ca_bundle(
    emulator: RunningEmulator, controller: Controller, settings: ControllerSettings
) -> None:
    config = webhook_configuration("inject.podtally.io", "inject-opt-in.podtally.io")
    validate(config)
    emulator.create(config)
    assert controller.sync_cert_files() is False  # nothing to serve yet
    controller.reconcile_webhook_tls()

    secret = emulator.stored("v1/secrets", OPNS, "podtally-webhook-tls")
    assert secret is not None
    validate(secret)
    ca, cert = unb64(secret, "ca.crt"), unb64(secret, "tls.crt")
    leaf = certs.load_certificate(cert)
    leaf.verify_directly_issued_by(certs.load_certificate(ca))
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"podtally-webhook.podtally-system.svc",
            "podtally-webhook.podtally-system.svc.cluster.local"} <= set(
        sans.get_values_for_type(x509.DNSName))

    patched = emulator.stored("admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
                              None, "podtally")
    assert patched is not None
    validate(patched)
    assert [w["clientConfig"]["caBundle"] for w in patched["webhooks"]] == [b64(ca)] * 2
    assert patched["webhooks"][0]["clientConfig"]["service"]["path"] == "/inject"  # kept

    assert controller.sync_cert_files() is True
    assert (settings.cert_dir / "tls.crt").read_bytes() == cert
    assert (settings.cert_dir / "tls.key").read_bytes() == unb64(secret, "tls.key")
    assert (settings.cert_dir / "tls.key").stat().st_mode & 0o077 == 0

    before = writes(emulator)
    controller.reconcile_webhook_tls()
    assert writes(emulator) == before  # nothing to renew, caBundle already right


def test_webhook_ca_rotation_keeps_the_old_ca_in_ca_bundle(
    emulator: RunningEmulator, controller: Controller
) -> None:
    now = dt.datetime.now(dt.UTC)
    old_ca = certs.generate_ca("podtally webhook CA", valid_days=365,
                               now=now - dt.timedelta(days=350))
    old_leaf = certs.issue_server_cert(*old_ca, desired.webhook_dns_names("podtally-webhook", OPNS),
                                       valid_days=365, now=now - dt.timedelta(days=350))
    emulator.create(webhook_configuration("inject.podtally.io"))
    emulator.create({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                     "metadata": {"name": "podtally-webhook-tls", "namespace": OPNS,
                                  "labels": MANAGED},
                     "data": {"tls.crt": b64(old_leaf[0]), "tls.key": b64(old_leaf[1]),
                              "ca.crt": b64(old_ca[0]), "ca.key": b64(old_ca[1])}})
    controller.reconcile_webhook_tls()

    secret = emulator.stored("v1/secrets", OPNS, "podtally-webhook-tls")
    bundle = pem_certs(unb64(secret, "ca.crt"))
    assert len(bundle) == 2 and bundle[1] == old_ca[0]
    certs.load_certificate(unb64(secret, "tls.crt")).verify_directly_issued_by(
        certs.load_certificate(bundle[0]))
    patched = emulator.stored("admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
                              None, "podtally")
    assert patched is not None
    assert patched["webhooks"][0]["clientConfig"]["caBundle"] == b64(b"".join(bundle))


def test_cert_manager_mode_only_reads_the_mounted_certificate(
    emulator: RunningEmulator, kube: Kube, settings: ControllerSettings, metrics: OperatorMetrics
) -> None:
    from dataclasses import replace

    cm = replace(settings, cert_manager=True)
    emulator.create(webhook_configuration("inject.podtally.io"))
    ctl = Controller(kube, cm, metrics, system_cas=SYSTEM_CAS)
    assert ctl.sync_cert_files() is False
    ca = certs.generate_ca("cert-manager CA")
    cert, key = certs.issue_server_cert(*ca, ["podtally-webhook.podtally-system.svc"])
    cm.cert_dir.mkdir()
    (cm.cert_dir / "tls.crt").write_bytes(cert)
    (cm.cert_dir / "tls.key").write_bytes(key)
    ctl.reconcile()
    assert ctl.sync_cert_files() is True
    assert emulator.stored("v1/secrets", OPNS, "podtally-webhook-tls") is None
    config = emulator.stored("admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
                             None, "podtally")
    assert config is not None and "caBundle" not in config["webhooks"][0]["clientConfig"]
    assert metrics.registry.get_sample_value(
        "podtally_operator_webhook_cert_not_after_timestamp_seconds"
    ) == certs.cert_not_after(cert).timestamp()


def test_missing_webhook_configuration_is_counted_and_retried(
    emulator: RunningEmulator, controller: Controller, metrics: OperatorMetrics
) -> None:
    controller.reconcile()
    assert metrics.registry.get_sample_value(
        "podtally_operator_reconcile_errors_total", {"stage": "webhook-tls"}) == 1
    emulator.create(webhook_configuration("inject.podtally.io"))
    controller.reconcile()
    config = emulator.stored("admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
                             None, "podtally")
    assert config is not None and config["webhooks"][0]["clientConfig"]["caBundle"]


# -- pods that should have been injected ----------------------------------------------


def pod(name: str, namespace: str, *, phase: str = "Running", labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None, host_network: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "app", "image": "nginx:1.14.2"}]}
    if host_network:
        spec["hostNetwork"] = True
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {},
                         "annotations": annotations or {}},
            "spec": spec, "status": {"phase": phase}}


def test_uninjected_pods_gauge_counts_only_pods_that_should_have_a_sidecar(
    emulator: RunningEmulator, controller: Controller, metrics: OperatorMetrics
) -> None:
    emulator.namespace("shop", ENABLED)
    emulator.namespace("plain")
    for obj in (
        pod("old-app", "shop"),  # created before the opt-in: counted
        pod("injected", "shop", annotations={"podtally.io/status": '{"version": 1}'}),
        pod("host", "shop", host_network=True),
        pod("opted-out", "shop", labels={"podtally.io/inject": "false"}),
        pod("opted-out-annotation", "shop", annotations={"podtally.io/inject": "false"}),
        pod("starting", "shop", phase="Pending"),
        pod("done", "shop", phase="Succeeded"),
        pod("elsewhere", "plain"),
    ):
        validate(obj)
        emulator.create(obj)
    controller.reconcile_namespaces()

    def gauge(ns: str) -> float | None:
        return metrics.registry.get_sample_value("podtally_operator_uninjected_pods",
                                                 {"namespace": ns})

    assert gauge("shop") == 1
    assert gauge("plain") is None
    emulator.label_namespace("shop", {"podtally.io/inject": None})
    controller.reconcile_namespaces()
    assert gauge("shop") is None


# -- leader election ------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def elector(kube: Kube, identity: str, clock: Clock) -> LeaderElector:
    return LeaderElector(kube, namespace=OPNS, name="podtally-operator", identity=identity,
                         clock=clock)


def test_only_the_leader_reconciles_and_a_follower_takes_over(
    emulator: RunningEmulator, kube: Kube, settings: ControllerSettings
) -> None:
    clock_a, clock_b = Clock(), Clock()
    a, b = elector(kube, "replica-a", clock_a), elector(kube, "replica-b", clock_b)
    ctl_a = Controller(kube, settings, OperatorMetrics(CollectorRegistry()),
                       system_cas=SYSTEM_CAS, is_leader=a.is_leader)
    ctl_b = Controller(kube, settings, OperatorMetrics(CollectorRegistry()),
                       system_cas=SYSTEM_CAS, is_leader=b.is_leader)
    emulator.namespace("shop", ENABLED)

    assert a.try_acquire_or_renew() is True
    assert b.try_acquire_or_renew() is False
    lease = emulator.stored("coordination.k8s.io/v1/leases", OPNS, "podtally-operator")
    assert lease is not None
    validate(lease)
    assert lease["spec"]["holderIdentity"] == "replica-a"
    assert lease["spec"]["leaseDurationSeconds"] == 15

    assert ctl_b.step() is False
    assert emulator.stored("v1/secrets", "shop", "podtally-ca") is None
    assert ctl_a.step() is True
    assert emulator.stored("v1/secrets", "shop", "podtally-ca") is not None

    # A keeps renewing: B waits however long it takes.
    for _ in range(10):
        clock_a.advance(2)
        clock_b.advance(2)
        assert a.try_acquire_or_renew() is True
        assert b.try_acquire_or_renew() is False

    # A stops renewing (hung, partitioned): after the lease duration, B takes over.
    clock_b.advance(10)
    assert b.try_acquire_or_renew() is False  # 10 s of silence: not yet
    clock_b.advance(6)
    assert b.try_acquire_or_renew() is True
    lease = emulator.stored("coordination.k8s.io/v1/leases", OPNS, "podtally-operator")
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == "replica-b"
    assert lease["spec"]["leaseTransitions"] == 1

    emulator.namespace("web", ENABLED)
    assert ctl_b.step() is True
    assert emulator.stored("v1/secrets", "web", "podtally-ca") is not None

    # A, back, has not renewed within its renew deadline: it no longer acts as leader,
    # and on its next round finds B holding the lease.
    clock_a.advance(16)
    assert a.is_leader() is False and ctl_a.step() is False
    assert a.try_acquire_or_renew() is False


def test_a_released_lease_is_taken_at_once(kube: Kube) -> None:
    clock = Clock()
    a, b = elector(kube, "replica-a", clock), elector(kube, "replica-b", clock)
    assert a.try_acquire_or_renew() is True
    assert b.try_acquire_or_renew() is False
    a.release()
    assert a.is_leader() is False
    assert b.try_acquire_or_renew() is True


def test_two_candidates_racing_for_a_lease_one_wins(
    emulator: RunningEmulator, kube: Kube
) -> None:
    clock = Clock()
    a = elector(kube, "replica-a", clock)
    assert a.try_acquire_or_renew() is True
    stale = kube.get_lease(OPNS, "podtally-operator")
    b = elector(kube, "replica-b", clock)
    b.release()  # no-op: not leading
    clock.advance(20)  # A is silent; B and C both see an expired lease...
    c = elector(kube, "replica-c", clock)
    assert c.try_acquire_or_renew() is False  # first sight of the record: starts its timer
    assert b.try_acquire_or_renew() is False
    clock.advance(16)

    class Stale(Kube):  # ...B read it before C wrote
        def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
            return stale

    b.kube = Stale(kube._api, timeout=5.0)
    assert c.try_acquire_or_renew() is True
    replaces = [r for r in emulator.requests() if r[0] == "PUT"]
    assert b.try_acquire_or_renew() is False  # its replace carried a stale resourceVersion
    assert len([r for r in emulator.requests() if r[0] == "PUT"]) == len(replaces) + 1
    lease = emulator.stored("coordination.k8s.io/v1/leases", OPNS, "podtally-operator")
    assert lease is not None and lease["spec"]["holderIdentity"] == "replica-c"


def test_elector_thread_renews_and_releases(kube: Kube, emulator: RunningEmulator) -> None:
    a = LeaderElector(kube, namespace=OPNS, name="podtally-operator", identity="replica-a",
                      lease_duration=3, renew_deadline=2, retry_period=0.1)
    stop = threading.Event()
    thread = threading.Thread(target=a.run, args=(stop,))
    thread.start()
    try:
        wait_for(a.is_leader)
        first = emulator.stored("coordination.k8s.io/v1/leases", OPNS, "podtally-operator")
        assert first is not None
        wait_for(lambda: (emulator.stored("coordination.k8s.io/v1/leases", OPNS,
                                          "podtally-operator") or {})["spec"]["renewTime"]
                 != first["spec"]["renewTime"])
    finally:
        stop.set()
        thread.join(10)
    lease = emulator.stored("coordination.k8s.io/v1/leases", OPNS, "podtally-operator")
    assert lease is not None and "holderIdentity" not in lease["spec"]
    validate(lease)


def test_a_pod_opting_in_on_its_own_gets_its_namespace_a_ca(
    emulator: RunningEmulator, controller: Controller, kube: Kube, metrics: OperatorMetrics
) -> None:
    """The pod wins over the namespace: an injected pod in a namespace that is not opted in
    mounts that namespace's CA, so the namespace gets one while such pods exist."""
    emulator.namespace("adhoc")
    emulator.namespace("kube-system")
    emulator.create(pod("batch", "adhoc", labels={"podtally.io/inject": "true"}))
    emulator.create(pod("sys", "kube-system", labels={"podtally.io/inject": "true"}))
    controller.reconcile_namespaces()
    assert emulator.stored("v1/secrets", "adhoc", "podtally-ca") is not None
    assert emulator.stored("v1/configmaps", "adhoc", "podtally-trust-bundle") is not None
    assert emulator.stored("v1/secrets", "kube-system", "podtally-ca") is None  # never
    assert metrics.registry.get_sample_value(
        "podtally_operator_uninjected_pods", {"namespace": "adhoc"}) == 1
    kube.core.delete_namespaced_pod("batch", "adhoc")
    controller.reconcile_namespaces()
    assert emulator.stored("v1/secrets", "adhoc", "podtally-ca") is None
