"""The reconcile loop: namespace CAs and trust bundles, the webhook's certificate, the gauges.

Level-triggered: every pass lists what exists and makes it what `desired` says, so a missed
event costs at most one resync period. Namespace events only wake the loop early. Only the
leader writes; every replica keeps its webhook certificate files in step with the Secret.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from podtally import certs
from podtally.control import desired
from podtally.control.desired import CaPolicy
from podtally.control.kube import Conflict, Kube, KubeError
from podtally.control.metrics import OperatorMetrics
from podtally.injection.decide import INJECT_KEY

log = logging.getLogger("podtally.operator.controller")

Obj = dict[str, Any]
SYSTEM_CA_FILES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")


def load_system_cas(paths: tuple[str, ...] = SYSTEM_CA_FILES) -> bytes:
    """The operator image's CA store (Debian, then RHEL layout), else certifi's."""
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError:
            continue
        if desired.split_certs(data):
            return data
    import certifi

    return Path(certifi.where()).read_bytes()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class ControllerSettings:
    operator_namespace: str
    policy: CaPolicy
    cert_dir: Path
    ca_secret: str = "podtally-ca"
    trust_bundle: str = "podtally-trust-bundle"
    webhook_service: str = "podtally-webhook"
    webhook_config: str = "podtally"
    cert_manager: bool = False
    resync_seconds: float = 60.0
    watch_timeout_seconds: int = 300


class Controller:
    def __init__(
        self, kube: Kube, settings: ControllerSettings, metrics: OperatorMetrics, *,
        system_cas: bytes, is_leader: Callable[[], bool] = lambda: True,
        clock: Callable[[], dt.datetime] = _now,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.metrics = metrics
        self.system_cas = system_cas
        self.is_leader = is_leader
        self.clock = clock
        self.passes = 0  # completed reconcile passes (tests, logs)
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._seen: dict[str, bool] = {}
        self._gauged: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._watch: Any = None

    # -- one pass ----------------------------------------------------------------------

    def step(self) -> bool:
        """Reconcile once if this replica leads; True if it did."""
        if not self.is_leader():
            return False
        self.reconcile()
        return True

    def reconcile(self) -> None:
        self._stage("namespaces", self.reconcile_namespaces)
        if not self.settings.cert_manager:
            self._stage("webhook-tls", self.reconcile_webhook_tls)
        self.passes += 1

    def _stage(self, stage: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except KubeError as err:
            log.warning("reconcile %s: %s", stage, err)
            self.metrics.reconcile_errors.labels(stage).inc()
        except Exception:  # noqa: BLE001 - a bug must not end the loop; it is retried
            log.exception("reconcile %s failed", stage)
            self.metrics.reconcile_errors.labels(stage).inc()

    def reconcile_namespaces(self) -> None:
        s, kube, now = self.settings, self.kube, self.clock()
        wanted: dict[str, dict[str, str]] = {}
        terminating: set[str] = set()
        # Pods labelled to opt in where their namespace is not (the chart's second webhook):
        # their namespace needs a CA too, or they wait for the Secret volume forever.
        pod_opt_in = {desired.namespace_of(p)
                      for p in kube.list_pods(labels={INJECT_KEY: "true"})}
        for ns_obj in kube.list_namespaces():
            name = desired.name_of(ns_obj)
            if desired.is_terminating(ns_obj):
                terminating.add(name)
            elif desired.wants_ca(name, desired.labels_of(ns_obj),
                                  operator_namespace=s.operator_namespace,
                                  has_opted_in_pods=name in pod_opt_in):
                wanted[name] = desired.labels_of(ns_obj)
        managed = desired.MANAGED_LABELS
        secrets = {desired.namespace_of(o): o for o in kube.list_secrets(labels=managed)
                   if desired.name_of(o) == s.ca_secret}
        bundles = {desired.namespace_of(o): o for o in kube.list_config_maps(labels=managed)
                   if desired.name_of(o) == s.trust_bundle}

        with_ca = 0
        for ns in sorted(wanted):
            try:
                with_ca += self._ensure_namespace(ns, secrets.get(ns), bundles.get(ns), now)
            except KubeError as err:
                log.warning("namespace %s: %s", ns, err)
                self.metrics.reconcile_errors.labels("namespace").inc()
        for ns in sorted(set(secrets) - set(wanted) - terminating):
            if kube.delete_secret(ns, s.ca_secret):
                log.info("namespace %s opted out: deleted Secret %s", ns, s.ca_secret)
        for ns in sorted(set(bundles) - set(wanted) - terminating):
            if kube.delete_config_map(ns, s.trust_bundle):
                log.info("namespace %s opted out: deleted ConfigMap %s", ns, s.trust_bundle)
        self.metrics.namespace_cas.set(with_ca)
        self._gauge_uninjected(wanted)

    def _ensure_namespace(self, ns: str, secret: Obj | None, bundle: Obj | None,
                          now: dt.datetime) -> int:
        s, kube = self.settings, self.kube
        if secret is None:  # maybe a CA someone else brought: never overwritten
            secret = kube.get_secret(ns, s.ca_secret)
        new_secret = desired.desired_ca_secret(secret, name=s.ca_secret, namespace=ns,
                                               policy=s.policy, now=now)
        if new_secret is not None:
            self._write(kube.create_secret if secret is None else kube.replace_secret,
                        new_secret, "rotated" if secret is not None else "created")
            secret = new_secret
        if bundle is None:
            bundle = kube.get_config_map(ns, s.trust_bundle)
        wanted_bundle = desired.trust_bundle(s.trust_bundle, ns, system_cas=self.system_cas,
                                             ca_secret_obj=secret or {}, now=now, current=bundle)
        new_bundle = desired.desired_trust_bundle(bundle, wanted_bundle)
        if new_bundle is not None:
            self._write(kube.create_config_map if bundle is None else kube.replace_config_map,
                        new_bundle, "updated" if bundle is not None else "created")
        return 1 if desired.read_ca(secret) is not None else 0

    def _write(self, fn: Callable[[Obj], Obj], body: Obj, what: str) -> None:
        try:
            fn(body)
        except Conflict:
            self._wake.set()  # changed under us: read again on the next pass, soon
            raise
        log.info("%s %s %s/%s", what, body["kind"], desired.namespace_of(body),
                 desired.name_of(body))

    def _gauge_uninjected(self, wanted: Mapping[str, Mapping[str, str]]) -> None:
        gauge = self.metrics.uninjected_pods
        for ns, labels in wanted.items():
            try:
                pods = self.kube.list_pods(ns)
            except KubeError as err:
                log.warning("listing pods of %s: %s", ns, err)
                self.metrics.reconcile_errors.labels("pods").inc()
                continue
            gauge.labels(ns).set(desired.count_uninjected(
                pods, ns, labels, operator_namespace=self.settings.operator_namespace))
        for ns in self._gauged - set(wanted):
            gauge.remove(ns)
        self._gauged = set(wanted)

    # -- the webhook's certificate -----------------------------------------------------

    def reconcile_webhook_tls(self) -> None:
        """Leader, self-managed mode: the serving Secret, and caBundle on the webhooks."""
        s, kube = self.settings, self.kube
        current = kube.get_secret(s.operator_namespace, desired.WEBHOOK_TLS_SECRET)
        new = desired.desired_webhook_tls(current, service=s.webhook_service,
                                          namespace=s.operator_namespace, policy=s.policy,
                                          now=self.clock())
        if new is not None:
            self._write(kube.create_secret if current is None else kube.replace_secret, new,
                        "issued" if current is None else "renewed")
            current = new
        ca = desired.secret_bytes(current, "ca.crt")
        config = kube.get_mutating_webhook_configuration(s.webhook_config)
        if config is None:
            raise KubeError(404, f"MutatingWebhookConfiguration {s.webhook_config} not found; "
                                 "its caBundle is set once it exists")
        ops = desired.ca_bundle_patch(config, ca)
        if ops:
            kube.json_patch_mutating_webhook_configuration(s.webhook_config, ops)
            log.info("set caBundle on MutatingWebhookConfiguration %s", s.webhook_config)

    def sync_cert_files(self) -> bool:
        """Every replica: the serving pair in `cert_dir`; True once it is there. In
        cert-manager mode the files are a mounted Secret and are only read."""
        s = self.settings
        if s.cert_manager:
            cert = _read(s.cert_dir / "tls.crt")
        else:
            secret = self.kube.get_secret(s.operator_namespace, desired.WEBHOOK_TLS_SECRET)
            cert = desired.secret_bytes(secret, "tls.crt")
            key = desired.secret_bytes(secret, "tls.key")
            if not cert or not key:
                return False
            s.cert_dir.mkdir(parents=True, exist_ok=True)
            # Key first: the server reloads only a pair that matches.
            _write_if_changed(s.cert_dir / "tls.key", key, 0o600)
            _write_if_changed(s.cert_dir / "tls.crt", cert, 0o644)
        if not cert:
            return False
        try:
            self.metrics.webhook_cert_not_after.set(certs.cert_not_after(cert).timestamp())
        except ValueError:
            return False
        return True

    # -- the loop ----------------------------------------------------------------------

    def kick(self) -> None:
        self._wake.set()

    def run(self) -> None:
        while not self._stopped.is_set():
            self._wake.clear()
            try:
                files = self.sync_cert_files()
            except Exception as err:  # noqa: BLE001 - e.g. a read-only --cert-dir: retried
                log.warning("webhook certificate files: %s", err)
                self.metrics.reconcile_errors.labels("cert-files").inc()
                files = False
            self.step()
            # Until this replica has a certificate to serve, look again every 2 s.
            self._wake.wait(self.settings.resync_seconds if files
                            else min(2.0, self.settings.resync_seconds))

    def watch(self) -> None:
        """Namespace events wake the loop when a namespace's opt-in changes."""
        while not self._stopped.is_set():
            try:
                self._watch = self.kube.watch_namespaces(
                    timeout_seconds=self.settings.watch_timeout_seconds)
                for kind, ns in self._watch:
                    if self._stopped.is_set():
                        return
                    self._observe(kind, ns)
            except KubeError as err:
                log.warning("watching namespaces: %s", err)
            self._stopped.wait(1.0)

    def _observe(self, kind: str, ns: Mapping[str, Any]) -> None:
        name = desired.name_of(ns)
        wants = kind != "DELETED" and not desired.is_terminating(ns) and desired.wants_ca(
            name, desired.labels_of(ns), operator_namespace=self.settings.operator_namespace)
        if self._seen.get(name) != wants:
            self._seen[name] = wants
            self.kick()

    def start(self) -> None:
        for target, name in ((self.run, "controller"), (self.watch, "namespace-watch")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._watch is not None:
            self._watch.stop()
        for thread in self._threads:
            thread.join(timeout=5)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _write_if_changed(path: Path, data: bytes, mode: int) -> None:
    if _read(path) == data:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
