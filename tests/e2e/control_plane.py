"""What Kubernetes' control plane does in the user story, around kmock's emulator (storage).

- `helm_install`: the chart rendered by Helm's own engine (tests/chart/helm_engine.py) and its
  objects created in the emulator, as `helm install` would.
- `ApiServer.create_pod`: the API server's pod CREATE path — defaulting
  (`serviceAccountName`), the mutating webhooks of every MutatingWebhookConfiguration whose
  rules, `namespaceSelector` and `objectSelector` match, each called over real HTTPS at its
  Service's endpoint (the ready pods the Service selects, the named `targetPort`), the
  server's certificate verified against the configuration's `caBundle` for the Service's DNS
  name, `failurePolicy` honoured; the RFC 6902 patch applied (jsonpatch); the name generated
  from `generateName` *after* admission, as the API server does (webhooks see no pod name);
  the result validated against the Kubernetes 1.30 schema (kubernetes-validate, strict);
  then stored.
- `replica_set_for` / `pod_for` / `job_for`: what the Deployment, ReplicaSet, Job and CronJob
  controllers create: ReplicaSets named `<deployment>-<pod-template-hash>`, pods named
  `<owner>-<5 chars>` with the controller's labels and ownerReferences, a CronJob's Job named
  `<cronjob>-<scheduled minute>`.
"""

from __future__ import annotations

import base64
import copy
import json
import secrets
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonpatch
import kubernetes_validate
import yaml

K8S_VERSION = "1.30.0"
ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # Kubernetes' rand.String / SafeEncodeString

# kind → (API path prefix, plural, namespaced)
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "Namespace": ("/api/v1", "namespaces", False),
    "Pod": ("/api/v1", "pods", True),
    "Secret": ("/api/v1", "secrets", True),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "Service": ("/api/v1", "services", True),
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "ReplicaSet": ("/apis/apps/v1", "replicasets", True),
    "Job": ("/apis/batch/v1", "jobs", True),
    "CronJob": ("/apis/batch/v1", "cronjobs", True),
    "MutatingWebhookConfiguration": ("/apis/admissionregistration.k8s.io/v1",
                                     "mutatingwebhookconfigurations", False),
    "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets", True),
    "PodMonitor": ("/apis/monitoring.coreos.com/v1", "podmonitors", True),
}


def resource_path(kind: str, namespace: str | None = None, name: str | None = None) -> str:
    prefix, plural, namespaced = RESOURCES[kind]
    path = f"{prefix}/namespaces/{namespace}/{plural}" if namespaced else f"{prefix}/{plural}"
    return f"{path}/{name}" if name else path


# ------------------------------------------------------------------------------ selectors


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A metav1.LabelSelector; an empty or absent selector matches everything."""
    selector = selector or {}
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _rule_matches(rules: Sequence[Mapping[str, Any]], group: str, version: str,
                  resource: str, operation: str) -> bool:
    def has(values: Sequence[str], value: str) -> bool:
        return "*" in values or value in values

    return any(has(r.get("apiGroups", []), group) and has(r.get("apiVersions", []), version)
               and has(r.get("resources", []), resource)
               and has(r.get("operations", []), operation) for r in rules)


# --------------------------------------------------------------------------- the server


@dataclass
class Admission:
    """What happened to one pod on its way into the API server."""

    webhooks_called: list[str]
    outcome: str  # "patched", "unchanged", "not called", "webhook unreachable: ..."
    patch: list[dict[str, Any]]
    pod: dict[str, Any]


class ApiServer:
    def __init__(self, url: str, log: Callable[[str], None]) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=10)
        self.log = log
        self.webhook_outage = False
        """While set, calls to webhooks fail to connect (their endpoints are gone)."""

    # -- plain REST ------------------------------------------------------------------------

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        resp = self.http.post(resource_path(obj["kind"], meta.get("namespace")), json=obj)
        if resp.status_code >= 300:
            raise RuntimeError(f"create {obj['kind']} {meta.get('name')}: {resp.status_code} "
                               f"{resp.text[:300]}")
        return dict(resp.json())

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        resp = self.http.get(resource_path(kind, namespace, name))
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        return dict(resp.json())

    def list(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        resp = self.http.get(resource_path(kind, namespace))
        if resp.status_code == 404:
            return []
        resp.raise_for_status()
        return list(resp.json().get("items") or [])

    # -- pod CREATE --------------------------------------------------------------------------

    def create_pod(self, pod: Mapping[str, Any]) -> Admission:
        pod = copy.deepcopy(dict(pod))
        meta = pod.setdefault("metadata", {})
        namespace = str(meta["namespace"])
        spec = pod.setdefault("spec", {})
        spec.setdefault("serviceAccountName", "default")  # the ServiceAccount admission plugin
        spec.setdefault("restartPolicy", "Always")
        ns_obj = self.get("Namespace", None, namespace)
        if ns_obj is None:
            raise RuntimeError(f"namespace {namespace} does not exist")
        ns_labels = {**(ns_obj["metadata"].get("labels") or {}),
                     "kubernetes.io/metadata.name": namespace}

        called: list[str] = []
        outcome, applied = "not called (no webhook matches)", []
        for config in self.list("MutatingWebhookConfiguration"):
            for hook in config.get("webhooks") or []:
                if not _rule_matches(hook.get("rules") or [], "", "v1", "pods", "CREATE"):
                    continue
                if not selector_matches(hook.get("namespaceSelector"), ns_labels):
                    continue
                if not selector_matches(hook.get("objectSelector"), meta.get("labels") or {}):
                    continue
                called.append(hook["name"])
                try:
                    patch = self._call_webhook(hook, pod, namespace)
                except (OSError, ssl.SSLError, httpx.HTTPError, RuntimeError) as err:
                    if hook.get("failurePolicy", "Fail") != "Ignore":
                        raise RuntimeError(f"webhook {hook['name']} failed: {err}") from err
                    outcome = f"webhook unreachable ({type(err).__name__}: {err}); " \
                              "failurePolicy Ignore: admitted unchanged"
                    continue
                if patch:
                    pod = jsonpatch.apply_patch(pod, patch)
                    applied += patch
                    outcome = f"patched ({len(patch)} JSON Patch operations)"
                elif not applied:
                    outcome = "admitted unchanged (webhook answered without a patch)"

        # After admission: the generated name, then validation, then storage.
        meta = pod["metadata"]
        if not meta.get("name"):
            meta["name"] = meta["generateName"] + "".join(
                secrets.choice(ALPHABET) for _ in range(5))
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        stored = self.create(pod)
        return Admission(called, outcome, applied, stored)

    def _endpoint(self, service_ref: Mapping[str, Any]) -> tuple[str, int]:
        """The Service's endpoint for its port: a ready pod it selects, the named target port."""
        ns, name = service_ref["namespace"], service_ref["name"]
        svc = self.get("Service", ns, name)
        if svc is None:
            raise RuntimeError(f"service {ns}/{name} not found")
        port = int(service_ref.get("port", 443))
        sport = next(p for p in svc["spec"]["ports"] if int(p["port"]) == port)
        for pod in self.list("Pod", ns):
            if not selector_matches({"matchLabels": svc["spec"].get("selector") or {}},
                                    pod["metadata"].get("labels") or {}):
                continue
            status = pod.get("status") or {}
            ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                        for c in status.get("conditions") or [])
            if not ready or not status.get("podIP"):
                continue
            target = sport.get("targetPort", port)
            if isinstance(target, str):
                target = next(int(p["containerPort"]) for c in pod["spec"]["containers"]
                              for p in c.get("ports") or [] if p.get("name") == target)
            return str(status["podIP"]), int(target)
        raise RuntimeError(f"service {ns}/{name} has no ready endpoints")

    def _call_webhook(self, hook: Mapping[str, Any], pod: Mapping[str, Any],
                      namespace: str) -> list[dict[str, Any]]:
        client = hook["clientConfig"]
        ref = client["service"]
        host = f"{ref['name']}.{ref['namespace']}.svc"
        ip, port = self._endpoint(ref)
        if self.webhook_outage:
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])  # nobody listens there: connection refused
            probe.close()
        ca = base64.b64decode(client.get("caBundle") or "").decode()
        if not ca:
            raise RuntimeError(f"{hook['name']}: no caBundle")
        ctx = ssl.create_default_context(cadata=ca)
        review = {
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": str(uuid.uuid4()),
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "name": pod["metadata"].get("name", ""), "namespace": namespace,
                "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:"
                                         "replicaset-controller",
                             "groups": ["system:serviceaccounts", "system:authenticated"]},
                "object": pod, "oldObject": None, "dryRun": False,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
            },
        }
        timeout = float(hook.get("timeoutSeconds", 10))
        path = f"{ref.get('path', '/')}?timeout={int(timeout)}s"
        body = json.dumps(review).encode()
        raw = socket.create_connection((ip, port), timeout=timeout)
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}:{ref.get('port', 443)}\r\n"
                        "Content-Type: application/json\r\nAccept: application/json\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                        + body)
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
        head, _, payload = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            raise RuntimeError(f"{hook['name']} answered HTTP {status}")
        response = json.loads(payload)["response"]
        if response.get("uid") != review["request"]["uid"]:
            raise RuntimeError(f"{hook['name']}: response uid does not match")
        if not response.get("allowed"):
            raise RuntimeError(f"{hook['name']} denied the pod: {response.get('status')}")
        if "patch" not in response:
            return []
        if response.get("patchType") != "JSONPatch":
            raise RuntimeError(f"{hook['name']}: patchType {response.get('patchType')}")
        return list(json.loads(base64.b64decode(response["patch"])))


# ------------------------------------------------------------------------------- Helm


def helm_install(api: ApiServer, chart: Path, namespace: str, release: str,
                 values: Mapping[str, Any], workdir: Path) -> list[dict[str, Any]]:
    """Render the chart with Helm's engine and create its objects, as `helm install
    --create-namespace` does. Returns the rendered documents."""
    from chart import helm_engine

    answer = helm_engine.run({"chart": str(chart), "lint": False, "renders": [{
        "id": "e2e", "values": dict(values), "namespace": namespace, "release": release,
        "kube_version": K8S_VERSION}]}, workdir)
    result = answer["renders"]["e2e"]
    if "error" in result:
        raise RuntimeError(f"helm install failed: {result['error']}")
    docs = [d for d in yaml.safe_load_all(result["manifest"]) if d]
    if api.get("Namespace", None, namespace) is None:
        api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    for doc in docs:
        doc.setdefault("metadata", {})
        if RESOURCES[doc["kind"]][2]:
            doc["metadata"].setdefault("namespace", namespace)
        api.create(doc)
    return docs


# ------------------------------------------------------------------------ the controllers


def _fnv32a(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def pod_template_hash(template: Mapping[str, Any]) -> str:
    digest = str(_fnv32a(json.dumps(template, sort_keys=True).encode()))
    return "".join(ALPHABET[ord(c) % len(ALPHABET)] for c in digest)


def _owner(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"],
            "name": obj["metadata"]["name"], "uid": obj["metadata"]["uid"],
            "controller": True, "blockOwnerDeletion": True}


def replica_set_for(deployment: Mapping[str, Any]) -> dict[str, Any]:
    """The ReplicaSet the Deployment controller creates for the current template."""
    template = copy.deepcopy(deployment["spec"]["template"])
    h = pod_template_hash(template)
    template["metadata"].setdefault("labels", {})["pod-template-hash"] = h
    meta = deployment["metadata"]
    selector = copy.deepcopy(deployment["spec"]["selector"])
    selector.setdefault("matchLabels", {})["pod-template-hash"] = h
    return {"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": f"{meta['name']}-{h}", "namespace": meta["namespace"],
                         "labels": dict(template["metadata"]["labels"]),
                         "ownerReferences": [_owner(deployment)]},
            "spec": {"replicas": deployment["spec"].get("replicas", 1), "selector": selector,
                     "template": template}}


def job_for(owner: Mapping[str, Any], scheduled: float | None = None) -> dict[str, Any]:
    """A Job as stored: the Job itself (with the API server's defaulted selector labels), or
    the Job a CronJob controller creates for the minute `scheduled`."""
    if owner["kind"] == "CronJob":
        minute = int((scheduled or time.time()) // 60)
        jt = copy.deepcopy(owner["spec"]["jobTemplate"])
        meta = {"name": f"{owner['metadata']['name']}-{minute}",
                "namespace": owner["metadata"]["namespace"],
                "labels": dict((jt.get("metadata") or {}).get("labels") or {}),
                "annotations": {"batch.kubernetes.io/cronjob-scheduled-timestamp":
                                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(minute * 60))},
                "ownerReferences": [_owner(owner)]}
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": jt["spec"]}
    else:
        job = copy.deepcopy(dict(owner))
    uid = str(uuid.uuid4())
    job["metadata"]["uid"] = uid
    labels = {"batch.kubernetes.io/controller-uid": uid, "controller-uid": uid,
              "batch.kubernetes.io/job-name": job["metadata"]["name"],
              "job-name": job["metadata"]["name"]}
    job["spec"]["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    job["spec"]["template"].setdefault("metadata", {}).setdefault("labels", {}).update(labels)
    return job


def pod_for(owner: Mapping[str, Any]) -> dict[str, Any]:
    """A pod as the ReplicaSet or Job controller sends it to the API server (generateName,
    no name yet)."""
    template = copy.deepcopy(owner["spec"]["template"])
    meta = template.get("metadata") or {}
    pod_meta: dict[str, Any] = {
        "generateName": f"{owner['metadata']['name']}-",
        "namespace": owner["metadata"]["namespace"],
        "labels": dict(meta.get("labels") or {}),
        "ownerReferences": [_owner(owner)],
    }
    if meta.get("annotations"):
        pod_meta["annotations"] = dict(meta["annotations"])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": template["spec"]}
