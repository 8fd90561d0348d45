"""The operator's metrics, on an explicit registry, and the plain-HTTP server exposing them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
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


class MetricsServer:
    """/metrics, /healthz, /readyz over plain HTTP on a thread of its own."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 ready: Callable[[], bool]) -> None:
        registry_, ready_ = registry, ready

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry_), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n")
                elif path == "/readyz":
                    ok = ready_()
                    self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
                else:
                    self._send(404, b"not found\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
