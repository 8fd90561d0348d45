"""`podtally operator`: the webhook on every replica, the controller on the leader."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from podtally.control.controller import Controller, ControllerSettings, load_system_cas
from podtally.control.desired import CaPolicy
from podtally.control.kube import Kube
from podtally.control.leader import LeaderElector
from podtally.control.metrics import OperatorMetrics
from podtally.control.webhook import Admission, NamespaceLabels, WebhookServer, kube_owner_lookup
from podtally.injection.render import InjectionConfig, render_parts
from podtally.metrics_server import MetricsServer

log = logging.getLogger("podtally.operator")


class OperatorSettings(BaseModel):
    """Flags of `podtally operator` (the chart sets them)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    namespace: str = "podtally-system"
    """The operator's own namespace: holds the webhook Secret and the Lease; never injected."""
    webhook_port: int = Field(9443, ge=0, le=65535)
    """HTTPS port of POST /inject (the webhook Service's targetPort)."""
    metrics_port: int = Field(9090, ge=0, le=65535)
    """Plain-HTTP port of /metrics, /healthz, /readyz."""
    webhook_service: str = "podtally-webhook"
    """The Service in front of the webhook: the serving certificate's DNS names."""
    webhook_config: str = "podtally"
    """The MutatingWebhookConfiguration whose caBundle is kept (self-managed mode)."""
    cert_dir: Path = Path("/tmp/podtally-webhook")
    """tls.crt and tls.key of the webhook: written here (self-managed) or mounted here
    (cert-manager). Must be writable in self-managed mode."""
    cert_manager: bool = False
    """cert-manager issues the serving certificate and its cainjector sets caBundle."""
    injection_config: Path | None = None
    """YAML of InjectionConfig's fields; unset fields keep their defaults."""
    injection_template: Path | None = None
    """The injection template (the chart's ConfigMap copy); default the packaged one."""
    leader_election: bool = True
    """Only one replica reconciles; off only for a single replica."""
    lease_name: str = "podtally-operator"
    ca_validity_days: int = Field(365, ge=2)
    """Lifetime of each namespace CA and of the webhook's CA and certificate."""
    ca_rotate_before_days: int = Field(30, ge=1)
    """Replace a CA with less than this left; the old one stays trusted until it expires."""
    resync_seconds: float = Field(60.0, gt=0)
    """Full reconcile period; namespace events reconcile sooner."""
    kubeconfig: Path | None = None
    """Out of cluster only; in a pod the service account is used."""

    def policy(self) -> CaPolicy:
        return CaPolicy.days(self.ca_validity_days, self.ca_rotate_before_days)


def load_injection_config(path: Path | None) -> InjectionConfig:
    if path is None:
        return InjectionConfig()
    data: Any = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: want a mapping of InjectionConfig fields")
    return InjectionConfig.model_validate(data)


def _identity() -> str:
    # Unique even when a pod restarts under the same name before its old lease expires.
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def run(settings: OperatorSettings, *, stop: threading.Event | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_injection_config(settings.injection_config)
    render_parts(config, "probe", template_path=settings.injection_template)  # fail fast
    policy = settings.policy()

    try:
        kube = Kube.from_environment(str(settings.kubeconfig) if settings.kubeconfig else None)
    except Exception as err:  # noqa: BLE001 - the client's config errors have no common base
        log.error("cannot configure the Kubernetes client: %s", err)
        return 2
    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    stop = stop or threading.Event()

    elector: LeaderElector | None = None
    controller_ref: list[Controller] = []

    def on_leadership(leading: bool) -> None:
        metrics.leader.set(1 if leading else 0)
        if leading and controller_ref:
            controller_ref[0].kick()

    if settings.leader_election:
        elector = LeaderElector(kube, namespace=settings.namespace, name=settings.lease_name,
                                identity=_identity(), on_change=on_leadership)
    else:
        metrics.leader.set(1)
    controller = Controller(
        kube,
        ControllerSettings(
            operator_namespace=settings.namespace, policy=policy, cert_dir=settings.cert_dir,
            ca_secret=config.ca_secret, trust_bundle=config.trust_bundle,
            webhook_service=settings.webhook_service, webhook_config=settings.webhook_config,
            cert_manager=settings.cert_manager, resync_seconds=settings.resync_seconds),
        metrics, system_cas=load_system_cas(),
        is_leader=elector.is_leader if elector else (lambda: True),
    )
    controller_ref.append(controller)

    quick = kube.with_timeout(2.0)  # inside the API server's webhook timeout
    admission = Admission(
        config=config, operator_namespace=settings.namespace,
        namespace_labels=NamespaceLabels(quick.get_namespace), lookup=kube_owner_lookup(quick),
        metrics=metrics, template_path=settings.injection_template)
    try:
        webhook = WebhookServer(host="", port=settings.webhook_port,
                                cert_dir=settings.cert_dir, admission=admission)
        metrics_server = MetricsServer("", settings.metrics_port, lambda: generate_latest(registry),
                                       ready=webhook.ready)
    except OSError as err:
        log.error("cannot listen: %s", err)
        return 1

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    metrics_server.start()
    webhook.start()
    elector_thread = None
    if elector is not None:
        elector_thread = threading.Thread(target=elector.run, args=(stop,), name="leader",
                                          daemon=True)
        elector_thread.start()
    controller.start()
    log.info("operator started: namespace %s, webhook :%d, metrics :%d, %s certificates",
             settings.namespace, webhook.port, metrics_server.port,
             "cert-manager" if settings.cert_manager else "self-managed")
    stop.wait()

    controller.stop()
    if elector_thread is not None:
        elector_thread.join(timeout=10)  # releases the lease on its way out
    webhook.stop()
    metrics_server.stop()
    kube.close()
    return 0
