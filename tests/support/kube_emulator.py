"""kmock's KubernetesEmulator, served over HTTP on a thread, for the official client.

kmock 0.8 (by kopf's author) keeps objects in memory and serves list/watch/get/create/patch/
delete. The gaps podtally's operator runs into are worked around here, and only here:

1. **Cluster-scoped `namespaces`.** kmock's `parse_path` reads `/api/v1/namespaces/NAME` as
   "namespace NAME, no resource", and `/api/v1/namespaces` fails to unpack (HTTP 500). The
   patched `parse_path` below routes `/api/v1/namespaces[/NAME[/status|/finalize]]` to the
   `v1/namespaces` resource; every other path goes to kmock's own parser.
2. **`?watch=True`.** The official client spells the flag `True`; kmock only knows `true`
   and answers a list instead of a stream. The patched `guess_k8s` lower-cases it.
3. **PUT (replace) is no action at all** (404). `Emulator` implements it: the object is
   replaced whole (a new version in kmock's history) and a MODIFIED event goes to watchers,
   with optimistic concurrency: a stale `metadata.resourceVersion` is a 409 Conflict.
4. **No `resourceVersion`.** Needed by 3 (the operator's Lease and Secret replaces are
   optimistic); `Emulator` stamps a counter on every create, patch and replace.
5. **Label selectors are ignored.** Not worked around here: podtally's client wrapper
   applies equality selectors again on its side, which is harmless against a real server.
6. **Patches merge naively** (a JSON merge where lists are replaced whole; no strategic
   merge). Not worked around: the operator patches the one list it touches (`webhooks[]`)
   with RFC 6902 JSON Patch, which kmock applies with `jsonpatch`, and replaces whole
   objects otherwise; tests patch only namespace labels, a map.

Listing a resource no object exists for yet is a 404 unless the resource is declared; that
is kmock's documented behaviour, not a gap: `Emulator` declares what the operator uses.

Everything else — storage, watch streams, discovery, errors — is kmock's own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import itertools
import json
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import aiohttp.web
import attrs
import kmock
import kubernetes.client as k8s
from kmock._internal import enums, parsing, rendering

T = TypeVar("T")

DECLARED = {
    "v1/namespaces": ("Namespace", False),
    "v1/pods": ("Pod", True),
    "v1/secrets": ("Secret", True),
    "v1/configmaps": ("ConfigMap", True),
    "apps/v1/replicasets": ("ReplicaSet", True),
    "apps/v1/deployments": ("Deployment", True),
    "batch/v1/jobs": ("Job", True),
    "coordination.k8s.io/v1/leases": ("Lease", True),
    "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations":
        ("MutatingWebhookConfiguration", False),
}

_original_parse_path = parsing.parse_path
_original_guess_k8s = parsing.guess_k8s


def _parse_path(path: str) -> parsing.ParsedPath:
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) in (3, 4, 5):
        if len(parts) == 5 and parts[4] not in ("status", "finalize"):
            return _original_parse_path(path)  # /api/v1/namespaces/NS/PLURAL: namespaced
        return parsing.ParsedPath(group="", version="v1", plural="namespaces", namespace=None,
                                  name=parts[3] if len(parts) > 3 else None,
                                  subresource=parts[4] if len(parts) > 4 else None)
    return _original_parse_path(path)


def _guess_k8s(k8s_path: parsing.ParsedPath, method: enums.method,
               query: dict[str, str]) -> enums.action | None:
    if "watch" in query:
        query = {**query, "watch": query["watch"].lower()}
    return _original_guess_k8s(k8s_path, method, query)


@contextlib.contextmanager
def patched_kmock_parsing() -> Iterator[None]:
    parsing.parse_path = _parse_path  # type: ignore[assignment]
    parsing.guess_k8s = _guess_k8s  # type: ignore[assignment]
    try:
        yield
    finally:
        parsing.parse_path = _original_parse_path  # type: ignore[assignment]
        parsing.guess_k8s = _original_guess_k8s  # type: ignore[assignment]


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus PUT and resourceVersion (gaps 3 and 4 above)."""

    _versions: Iterator[int] = attrs.field(factory=lambda: itertools.count(1), init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, (kind, namespaced) in DECLARED.items():
            self.resources[key] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced,
                verbs={"get", "list", "watch", "create", "update", "patch", "delete"})

    def _stamp(self, meta: dict[str, Any]) -> None:
        meta["resourceVersion"] = str(next(self._versions))

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None:
            if request.method == enums.method.PUT and request.name is not None:
                return await self._replace(request)
            if request.action == enums.action.CREATE and isinstance(request.data, dict):
                meta = request.data.setdefault("metadata", {})
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp",
                                dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
                self._stamp(meta)
            elif request.action == enums.action.UPDATE and request.name is not None:
                if isinstance(request.data, dict):
                    self._stamp(request.data.setdefault("metadata", {}))
                elif isinstance(request.data, list):  # RFC 6902
                    request.data.append({"op": "add", "path": "/metadata/resourceVersion",
                                         "value": str(next(self._versions))})
        return await super()._handle(request)

    async def _replace(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        assert request.resource is not None
        key = (request.resource, request.namespace, request.name)
        body = request.data
        if not isinstance(body, dict):
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="not an object")
        async with self._lock:
            if key not in self._objects or self._objects[key].deleted:
                raise kmock.KubernetesObjectNotFoundError()
            old_meta = dict(self._objects[key].get("metadata") or {})
            meta = body.setdefault("metadata", {})
            sent = meta.get("resourceVersion")
            if sent and sent != old_meta.get("resourceVersion"):
                raise kmock.KubernetesError(
                    status=409, reason="Conflict",
                    message=f"the object has been modified (resourceVersion {sent} is stale)")
            for field in ("uid", "creationTimestamp"):
                if field in old_meta:
                    meta[field] = old_meta[field]
            self._stamp(meta)
            self._objects[key].create(body)
            raw = self._objects[key].raw
            await self._buses[request.resource].put({"type": "MODIFIED", "object": raw})
        return aiohttp.web.json_response(raw)


class RunningEmulator:
    """The emulator on its own event loop thread; the official (blocking) client talks to it
    over HTTP like to any API server."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.emulator: Emulator | None = None
        self.url = ""
        self._thread = threading.Thread(target=self._main, name="kmock", daemon=True)
        self._patch = patched_kmock_parsing()

    def _main(self) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopped = asyncio.Event()
            async with Emulator() as emulator, kmock.Server(emulator) as server:
                self.emulator = emulator
                self.url = str(server.url).rstrip("/")
                self._ready.set()
                await self._stopped.wait()

        try:
            asyncio.run(serve())
        except BaseException as err:  # noqa: BLE001 - surfaced by __enter__
            self._error = err
            self._ready.set()

    def __enter__(self) -> RunningEmulator:
        self._patch.__enter__()
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"kmock did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout=10)
        self._patch.__exit__(None, None, None)

    # -- reading the emulator's state from the test's thread ---------------------------

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the emulator's loop (its state is only touched there)."""
        assert self._loop is not None
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as err:  # noqa: BLE001
                future.set_exception(err)

        self._loop.call_soon_threadsafe(run)
        return future.result(timeout=10)

    def stored(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object as stored, or None (never created, or deleted)."""
        assert self.emulator is not None
        objects = self.emulator.objects

        def read() -> dict[str, Any] | None:
            key = (kmock.resource(resource), namespace, name)
            if key not in objects or objects[resource, namespace, name].deleted:
                return None
            return dict(objects[resource, namespace, name].raw)

        return self.call(read)

    def requests(self) -> list[tuple[str, str]]:
        """(method, path?query) of every request served so far."""
        assert self.emulator is not None
        emulator = self.emulator
        return self.call(lambda: [(str(r.method.value), str(r.url.path_qs))
                                  for r in emulator._requests])

    # -- the official client, for the tests' own set-up -----------------------------------

    def api(self) -> k8s.ApiClient:
        cfg = k8s.Configuration()
        cfg.host = self.url
        return k8s.ApiClient(cfg)

    def create(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Create any object the operator reads (namespaces, pods, owners, configs)."""
        api = self.api()
        kind, meta = body["kind"], body["metadata"]
        ns = meta.get("namespace")
        calls: dict[str, Callable[[], Any]] = {
            "Namespace": lambda: k8s.CoreV1Api(api).create_namespace(body, **_raw),
            "Pod": lambda: k8s.CoreV1Api(api).create_namespaced_pod(ns, body, **_raw),
            "Secret": lambda: k8s.CoreV1Api(api).create_namespaced_secret(ns, body, **_raw),
            "ConfigMap": lambda: k8s.CoreV1Api(api).create_namespaced_config_map(
                ns, body, **_raw),
            "ReplicaSet": lambda: k8s.AppsV1Api(api).create_namespaced_replica_set(
                ns, body, **_raw),
            "Job": lambda: k8s.BatchV1Api(api).create_namespaced_job(ns, body, **_raw),
            "MutatingWebhookConfiguration":
                lambda: k8s.AdmissionregistrationV1Api(api)
                .create_mutating_webhook_configuration(body, **_raw),
        }
        with api:
            return dict(json.loads(calls[kind]().data))

    def namespace(self, name: str, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
        return self.create({"apiVersion": "v1", "kind": "Namespace",
                            "metadata": {"name": name, "labels": dict(labels or {})}})

    def label_namespace(self, name: str, labels: Mapping[str, str | None]) -> None:
        """A JSON merge patch of the labels; None removes a label."""
        with self.api() as api:
            k8s.CoreV1Api(api).patch_namespace(
                name, {"metadata": {"labels": dict(labels)}},
                _content_type="application/merge-patch+json", **_raw)


_raw: dict[str, Any] = {"_preload_content": False}
