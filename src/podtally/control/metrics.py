"""The operator's metrics, on an explicit registry, and the plain-HTTP server exposing them."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
)


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.injections = Counter(
            "podtally_operator_injections",
            "Pod admissions by outcome: injected, skipped (reason: why not), or error (the pod "
            "was admitted unchanged: the webhook fails open).",
            ("result", "reason"), registry=registry,
        )
        self.uninjected_pods = Gauge(
            "podtally_operator_uninjected_pods",
            "Running pods in opted-in namespaces that the webhook would inject but that have no "
            "sidecar (created before the opt-in, or while the webhook was unreachable).",
            ("namespace",), registry=registry,
        )
        self.namespace_cas = Gauge(
            "podtally_operator_namespace_cas",
            "Namespaces holding a podtally CA Secret.", registry=registry,
        )
        self.leader = Gauge(
            "podtally_operator_leader",
            "1 while this replica holds the leader Lease (only the leader reconciles).",
            registry=registry,
        )
        self.reconcile_errors = Counter(
            "podtally_operator_reconcile_errors",
            "Failed reconcile steps, by stage; retried at the next resync.",
            ("stage",), registry=registry,
        )
        self.webhook_cert_not_after = Gauge(
            "podtally_operator_webhook_cert_not_after_timestamp_seconds",
            "notAfter of the certificate the webhook serves.", registry=registry,
        )
