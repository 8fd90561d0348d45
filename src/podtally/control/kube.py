"""The one module that imports `kubernetes`: a small typed wrapper speaking plain dicts.

Objects go in and come out as the API server's JSON (`_preload_content=False`), never as the
client's generated models, so the rest of the operator is pure code over dicts. Errors come
out as `KubeError` (`NotFound`, `Conflict`); reads of a missing object return None.

Label selectors are sent to the server *and* applied again here: equality selectors only,
which is all the operator uses, and a server (or emulator) that ignores them costs nothing
but bandwidth.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import kubernetes.client as k8s
import kubernetes.config
import kubernetes.watch
import urllib3.exceptions
from kubernetes.client.rest import ApiException

Obj = dict[str, Any]

JSON_PATCH = "application/json-patch+json"


class KubeError(Exception):
    """An API call failed; `status` is the HTTP status, 0 when the server was not reached."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    """409: the object exists (create) or changed since it was read (replace)."""


def _error(err: ApiException) -> KubeError:
    status = int(err.status or 0)
    message = str(err.reason or "")
    if err.body:
        try:
            message = json.loads(err.body).get("message") or message
        except (ValueError, AttributeError):
            message = str(err.body)[:500]
    cls = NotFound if status == 404 else Conflict if status == 409 else KubeError
    return cls(status, message)


def match_labels(obj: Mapping[str, Any], labels: Mapping[str, str] | None) -> bool:
    have = (obj.get("metadata") or {}).get("labels") or {}
    return all(have.get(k) == v for k, v in (labels or {}).items())


def _selector(labels: Mapping[str, str] | None) -> str | None:
    return ",".join(f"{k}={v}" for k, v in labels.items()) if labels else None


class Kube:
    """A connection to one API server; thread-safe (urllib3 pools the connections)."""

    def __init__(self, api: Any, *, timeout: float = 10.0) -> None:
        self._api = api
        self.timeout = timeout
        self.core = k8s.CoreV1Api(api)
        self.apps = k8s.AppsV1Api(api)
        self.batch = k8s.BatchV1Api(api)
        self.admission = k8s.AdmissionregistrationV1Api(api)
        self.coordination = k8s.CoordinationV1Api(api)

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_environment(cls, kubeconfig: str | None = None, *, timeout: float = 10.0) -> Kube:
        """The pod's service account in a cluster; else `kubeconfig` (or $KUBECONFIG,
        ~/.kube/config)."""
        cfg = k8s.Configuration()
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            kubernetes.config.load_incluster_config(client_configuration=cfg)
        else:
            kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=cfg,
                                               persist_config=False)
        return cls(k8s.ApiClient(cfg), timeout=timeout)

    @classmethod
    def for_host(cls, host: str, *, token: str | None = None, ca_file: str | None = None,
                 timeout: float = 10.0) -> Kube:
        """An explicit API server URL (tests, `kubectl proxy`)."""
        cfg = k8s.Configuration()
        cfg.host = host.rstrip("/")
        if token:
            cfg.api_key = {"authorization": token}
            cfg.api_key_prefix = {"authorization": "Bearer"}
        if ca_file:
            cfg.ssl_ca_cert = ca_file
        return cls(k8s.ApiClient(cfg), timeout=timeout)

    def with_timeout(self, timeout: float) -> Kube:
        """The same connection pool with another per-request timeout (the webhook's budget)."""
        return Kube(self._api, timeout=timeout)

    def close(self) -> None:
        self._api.close()

    # -- plumbing ----------------------------------------------------------------------

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            resp = fn(*args, _preload_content=False, _request_timeout=self.timeout, **kwargs)
        except ApiException as err:
            raise _error(err) from err
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise KubeError(0, f"API server unreachable: {err}") from err
        data = resp.data
        return json.loads(data) if data else {}

    def _get(self, fn: Callable[..., Any], *args: Any) -> Obj | None:
        try:
            return cast(Obj, self._call(fn, *args))
        except NotFound:
            return None

    def _list(self, fn: Callable[..., Any], *args: Any,
              labels: Mapping[str, str] | None = None, **kwargs: Any) -> list[Obj]:
        body = self._call(fn, *args, label_selector=_selector(labels), **kwargs)
        return [o for o in body.get("items") or [] if match_labels(o, labels)]

    def _delete(self, fn: Callable[..., Any], *args: Any) -> bool:
        try:
            self._call(fn, *args)
        except NotFound:
            return False
        return True

    # -- namespaces and pods -----------------------------------------------------------

    def list_namespaces(self) -> list[Obj]:
        return self._list(self.core.list_namespace)

    def get_namespace(self, name: str) -> Obj | None:
        return self._get(self.core.read_namespace, name)

    def watch_namespaces(self, *, timeout_seconds: int = 300) -> NamespaceWatch:
        return NamespaceWatch(self, timeout_seconds)

    def list_pods(self, namespace: str | None = None, *,
                  labels: Mapping[str, str] | None = None,
                  node: str | None = None) -> list[Obj]:
        """Pods (of one node: `node`, checked again here like label selectors)."""
        extra = {"field_selector": f"spec.nodeName={node}"} if node else {}
        if namespace is None:
            pods = self._list(self.core.list_pod_for_all_namespaces, labels=labels, **extra)
        else:
            pods = self._list(self.core.list_namespaced_pod, namespace, labels=labels, **extra)
        return [p for p in pods if node is None or _node_of(p) == node]

    def watch_pods(self, *, node: str | None = None, timeout_seconds: int = 300) -> Watch:
        """Pod events of all namespaces (of one node: `node`). Without a resourceVersion the
        server first sends every existing pod as ADDED, so no list is needed before."""
        extra = {"field_selector": f"spec.nodeName={node}"} if node else {}
        return Watch(self, self.core.list_pod_for_all_namespaces, timeout_seconds,
                     keep=lambda p: node is None or _node_of(p) == node, **extra)

    # -- Secrets and ConfigMaps --------------------------------------------------------

    def get_secret(self, namespace: str, name: str) -> Obj | None:
        return self._get(self.core.read_namespaced_secret, name, namespace)

    def list_secrets(self, namespace: str | None = None, *,
                     labels: Mapping[str, str] | None = None) -> list[Obj]:
        if namespace is None:
            return self._list(self.core.list_secret_for_all_namespaces, labels=labels)
        return self._list(self.core.list_namespaced_secret, namespace, labels=labels)

    def create_secret(self, body: Obj) -> Obj:
        return cast(Obj, self._call(self.core.create_namespaced_secret, _ns(body), body))

    def replace_secret(self, body: Obj) -> Obj:
        """Optimistic: fails with Conflict when metadata.resourceVersion is stale."""
        return cast(Obj, self._call(self.core.replace_namespaced_secret,
                                    _name(body), _ns(body), body))

    def delete_secret(self, namespace: str, name: str) -> bool:
        return self._delete(self.core.delete_namespaced_secret, name, namespace)

    def get_config_map(self, namespace: str, name: str) -> Obj | None:
        return self._get(self.core.read_namespaced_config_map, name, namespace)

    def list_config_maps(self, namespace: str | None = None, *,
                         labels: Mapping[str, str] | None = None) -> list[Obj]:
        if namespace is None:
            return self._list(self.core.list_config_map_for_all_namespaces, labels=labels)
        return self._list(self.core.list_namespaced_config_map, namespace, labels=labels)

    def create_config_map(self, body: Obj) -> Obj:
        return cast(Obj, self._call(self.core.create_namespaced_config_map, _ns(body), body))

    def replace_config_map(self, body: Obj) -> Obj:
        return cast(Obj, self._call(self.core.replace_namespaced_config_map,
                                    _name(body), _ns(body), body))

    def delete_config_map(self, namespace: str, name: str) -> bool:
        return self._delete(self.core.delete_namespaced_config_map, name, namespace)

    # -- webhook configuration ---------------------------------------------------------

    def get_mutating_webhook_configuration(self, name: str) -> Obj | None:
        return self._get(self.admission.read_mutating_webhook_configuration, name)

    def json_patch_mutating_webhook_configuration(self, name: str,
                                                  patch: list[Obj]) -> Obj:
        """RFC 6902: index-addressed, guarded by `test` ops, never a merge of the list."""
        return cast(Obj, self._call(self.admission.patch_mutating_webhook_configuration,
                                    name, patch, _content_type=JSON_PATCH))

    # -- owners (workload resolution) --------------------------------------------------

    def get_replica_set(self, namespace: str, name: str) -> Obj | None:
        return self._get(self.apps.read_namespaced_replica_set, name, namespace)

    def get_job(self, namespace: str, name: str) -> Obj | None:
        return self._get(self.batch.read_namespaced_job, name, namespace)

    # -- leases (leader election) ------------------------------------------------------

    def get_lease(self, namespace: str, name: str) -> Obj | None:
        return self._get(self.coordination.read_namespaced_lease, name, namespace)

    def create_lease(self, body: Obj) -> Obj:
        return cast(Obj, self._call(self.coordination.create_namespaced_lease, _ns(body), body))

    def replace_lease(self, body: Obj) -> Obj:
        """Optimistic: fails with Conflict when metadata.resourceVersion is stale."""
        return cast(Obj, self._call(self.coordination.replace_namespaced_lease,
                                    _name(body), _ns(body), body))


class Watch:
    """Events as (type, object) until the server ends the stream, the read times out
    (a quiet stream is not an error), or `stop()` is called from another thread."""

    def __init__(self, kube: Kube, list_fn: Callable[..., Any], timeout_seconds: int, *,
                 keep: Callable[[Obj], bool] | None = None, **kwargs: Any) -> None:
        self._kube = kube
        self._list_fn = list_fn
        self._timeout = timeout_seconds
        self._keep = keep
        self._kwargs = kwargs
        self._watch = kubernetes.watch.Watch()

    def __iter__(self) -> Iterator[tuple[str, Obj]]:
        # Plain JSON, never the client's models: their validation rejects objects the
        # server itself accepted (a container status without an image, say).
        stream = self._watch.stream(
            self._list_fn, timeout_seconds=self._timeout, deserialize=False,
            _request_timeout=(self._kube.timeout, self._timeout + 5), **self._kwargs)
        try:
            for event in stream:
                obj = event.get("object") if isinstance(event, dict) else None
                if not isinstance(obj, dict):
                    continue  # keep-alive blank lines
                if self._keep is None or self._keep(cast(Obj, obj)):
                    yield str(event.get("type", "")), cast(Obj, obj)
        except ApiException as err:
            if err.status != 410:  # Gone: the caller lists again and re-watches
                raise _error(err) from err
        except KeyError:
            return  # an ERROR event, which the client reads from a key it did not set
        except (urllib3.exceptions.HTTPError, OSError):
            return  # read timeout on a quiet stream, or stop() shut the socket

    def stop(self) -> None:
        self._watch.stop()


class NamespaceWatch(Watch):
    def __init__(self, kube: Kube, timeout_seconds: int) -> None:
        super().__init__(kube, kube.core.list_namespace, timeout_seconds)


def _node_of(pod: Mapping[str, Any]) -> str | None:
    node = (pod.get("spec") or {}).get("nodeName")
    return str(node) if node else None


def _ns(body: Mapping[str, Any]) -> str:
    return str(body["metadata"]["namespace"])


def _name(body: Mapping[str, Any]) -> str:
    return str(body["metadata"]["name"])
