"""The mutating admission webhook: HTTPS, POST /inject (AdmissionReview v1), GET /healthz.

It fails open: whatever goes wrong inside (the namespace lookup, the template, a bug), the pod
is admitted unchanged and the error is counted — metering must never stop a deployment. (The
webhook configuration says `failurePolicy: Ignore` too, for when the server is unreachable.)

The serving certificate is read from `cert_dir` (tls.crt, tls.key) and re-read when those
files change: the controller rotates them (self-managed mode), or kubelet updates the mounted
Secret (cert-manager mode). Each replica serves; only the API server's TLS needs it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from podtally.control.kube import Kube, KubeError
from podtally.control.metrics import OperatorMetrics
from podtally.injection.admission import review
from podtally.injection.render import InjectionConfig, TemplatePath
from podtally.injection.workload import OwnerLookup, controller_owner

log = logging.getLogger("podtally.operator.webhook")

# The API server limits request bodies to 3 MiB; an AdmissionReview can carry the object and
# the old object, so twice that, and not a byte more.
MAX_BODY = 6 * 1024 * 1024
CERT_FILE, KEY_FILE = "tls.crt", "tls.key"


class NamespaceLabels:
    """Namespace labels by name, cached for `ttl` seconds: every pod admission needs them,
    and a label change should still be seen within seconds. Lookup errors are not cached."""

    def __init__(self, fetch: Callable[[str], Mapping[str, Any] | None], *, ttl: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch, self._ttl, self._clock = fetch, ttl, clock
        self._cache: dict[str, tuple[float, dict[str, str]]] = {}
        self._lock = threading.Lock()

    def __call__(self, namespace: str) -> dict[str, str]:
        now = self._clock()
        with self._lock:
            hit = self._cache.get(namespace)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        obj = self._fetch(namespace)
        labels = {str(k): str(v) for k, v in
                  (((obj or {}).get("metadata") or {}).get("labels") or {}).items()}
        with self._lock:
            if len(self._cache) > 4096:  # namespaces come and go; never grow without bound
                self._cache.clear()
            self._cache[namespace] = (now, labels)
        return labels


def kube_owner_lookup(kube: Kube) -> OwnerLookup:
    """ReplicaSet → its Deployment, Job → its CronJob; an ownerless one is its own workload.
    None (unknown) on any error: the workload then falls back to the names' conventions."""

    def lookup(kind: str, namespace: str, name: str) -> tuple[str, str] | None:
        getters = {"ReplicaSet": kube.get_replica_set, "Job": kube.get_job}
        if kind not in getters:
            return None
        try:
            obj = getters[kind](namespace, name)
        except KubeError as err:
            log.debug("owner lookup %s %s/%s: %s", kind, namespace, name, err)
            return None
        if obj is None:
            return None
        return controller_owner(obj.get("metadata") or {}) or (kind, name)

    return lookup


class Admission:
    """Bytes of an AdmissionReview in, (HTTP status, bytes) out; never raises."""

    def __init__(
        self, *, config: InjectionConfig, operator_namespace: str,
        namespace_labels: Callable[[str], Mapping[str, str]], lookup: OwnerLookup | None,
        metrics: OperatorMetrics, template_path: TemplatePath | None = None,
    ) -> None:
        self.config = config
        self.operator_namespace = operator_namespace
        self.namespace_labels = namespace_labels
        self.lookup = lookup
        self.metrics = metrics
        self.template_path = template_path

    def __call__(self, body: bytes) -> tuple[int, bytes]:
        try:
            request_review = json.loads(body)
            req = request_review.get("request")
            if not isinstance(req, dict):
                raise ValueError("no request")
            uid = str(req.get("uid", ""))
        except (ValueError, AttributeError, UnicodeDecodeError):
            self.metrics.injections.labels("error", "bad-request").inc()
            return 400, b'{"error": "not an AdmissionReview"}\n'
        try:
            outcome = self._review(request_review, req)
        except Exception:  # noqa: BLE001 - fail open, whatever it was
            log.exception("admission %s failed; admitting the pod unchanged", uid)
            self.metrics.injections.labels("error", "internal").inc()
            return 200, _json({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                               "response": {"uid": uid, "allowed": True}})
        decision = outcome.decision
        result = "injected" if decision.inject else "skipped"
        self.metrics.injections.labels(result, decision.reason).inc()
        return 200, _json(outcome.response)

    def _review(self, request_review: Mapping[str, Any], req: Mapping[str, Any]) -> Any:
        labels: Mapping[str, str] = {}
        if (req.get("kind") or {}).get("kind") == "Pod" and req.get("operation") == "CREATE":
            pod_meta = (req.get("object") or {}).get("metadata") or {}
            namespace = req.get("namespace") or pod_meta.get("namespace") or "default"
            labels = self.namespace_labels(str(namespace))
        return review(request_review, config=self.config, namespace_labels=labels,
                      operator_namespace=self.operator_namespace, lookup=self.lookup,
                      template_path=self.template_path)


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class _CertReloader:
    """An SSLContext for the files in `cert_dir`, rebuilt when they change (checked at most
    every `interval` seconds, on new connections)."""

    def __init__(self, cert_dir: Path, interval: float = 5.0) -> None:
        self.cert_dir = Path(cert_dir)
        self.interval = interval
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._context: ssl.SSLContext | None = None
        self._lock = threading.Lock()

    def _files_stamp(self) -> tuple[int, int] | None:
        try:
            return (os.stat(self.cert_dir / CERT_FILE).st_mtime_ns,
                    os.stat(self.cert_dir / KEY_FILE).st_mtime_ns)
        except OSError:
            return None

    def context(self, *, force: bool = False) -> ssl.SSLContext | None:
        with self._lock:
            now = time.monotonic()
            if not force and self._context is not None and now - self._checked < self.interval:
                return self._context
            self._checked = now
            stamp = self._files_stamp()
            if stamp is None or stamp == self._stamp:
                return self._context
            try:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                ctx.load_cert_chain(self.cert_dir / CERT_FILE, self.cert_dir / KEY_FILE)
            except (OSError, ssl.SSLError) as err:  # half-written pair: try again later
                log.warning("webhook certificate in %s not loadable yet: %s", self.cert_dir, err)
                return self._context
            if self._context is not None:
                log.info("webhook certificate reloaded from %s", self.cert_dir)
            self._context, self._stamp = ctx, stamp
            return ctx


class _TLSServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    reloader: _CertReloader

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        ctx = self.reloader.context()
        if ctx is None:  # cannot happen once serving started; be safe anyway
            sock.close()
            raise OSError("no certificate")
        # The handshake happens in the connection's own thread (handler setup), so a slow
        # client never holds up accept().
        return ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("webhook connection from %s failed", client_address, exc_info=True)


class WebhookServer:
    def __init__(self, *, host: str, port: int, cert_dir: Path, admission: Admission,
                 max_body: int = MAX_BODY, idle_timeout: float = 30.0) -> None:
        self.reloader = _CertReloader(cert_dir)
        self._serving = threading.Event()
        self._stop = threading.Event()
        admit, limit = admission, max_body

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # the API server keeps connections open
            timeout = idle_timeout

            def setup(self) -> None:
                super().setup()
                self.request.do_handshake()

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.split("?", 1)[0] != "/inject":
                    self._send(404, b'{"error": "not found"}\n')
                    return
                length = self.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    self._send(411, b'{"error": "Content-Length required"}\n', close=True)
                    return
                if int(length) > limit:
                    admit.metrics.injections.labels("error", "too-large").inc()
                    self._send(413, b'{"error": "request too large"}\n', close=True)
                    return
                status, body = admit(self.rfile.read(int(length)))
                self._send(status, body)

            def do_GET(self) -> None:  # noqa: N802
                if self.path.split("?", 1)[0] in ("/healthz", "/readyz"):
                    self._send(200, b"ok\n", ctype="text/plain")
                else:
                    self._send(404, b'{"error": "not found"}\n')

            def _send(self, code: int, body: bytes, ctype: str = "application/json",
                      close: bool = False) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                if close:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.httpd = _TLSServer((host, port), Handler, bind_and_activate=True)
        self.httpd.reloader = self.reloader
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self._serve, name="webhook", daemon=True)

    def _serve(self) -> None:
        while self.reloader.context(force=True) is None:  # the certificate comes later
            if self._stop.wait(0.5):
                return
        self._serving.set()
        log.info("webhook serving HTTPS on port %d", self.port)
        self.httpd.serve_forever(poll_interval=0.5)

    def start(self) -> None:
        self.thread.start()

    def ready(self) -> bool:
        return self._serving.is_set()

    def wait_ready(self, timeout: float) -> bool:
        return self._serving.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._serving.is_set():
            self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
