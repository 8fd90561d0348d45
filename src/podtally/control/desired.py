"""What the controller wants to exist, as pure functions over plain dicts and `now`.

- Each opted-in namespace has its own CA (a `kubernetes.io/tls` Secret) and a trust bundle
  (a ConfigMap: the system CAs plus that CA). A CA is replaced before it expires; the one it
  replaces stays in the bundle until it expires itself, so pods whose sidecar still signs
  with it keep working until they restart.
- The webhook's serving certificate comes from a CA of its own, kept the same way: the
  caBundle the API server trusts holds the current CA and, until it expires, the previous.
- Only objects labelled `app.kubernetes.io/managed-by=podtally` are ever changed or deleted:
  a Secret of the same name made by someone else is a CA they bring, used as it is.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from podtally import certs
from podtally.injection.decide import (
    ALWAYS_EXCLUDED,
    INJECT_KEY,
    NAMESPACE_ENABLED,
    STATUS_ANNOTATION,
    decide,
)

Obj = dict[str, Any]

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_LABELS = {MANAGED_BY: "podtally"}
COMPONENT = "app.kubernetes.io/component"
BUNDLE_KEY = "ca-bundle.crt"
PREVIOUS_KEY = "previous.crt"  # CAs replaced by a rotation, kept until they expire
WEBHOOK_TLS_SECRET = "podtally-webhook-tls"

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)


@dataclass(frozen=True)
class CaPolicy:
    validity: dt.timedelta
    """Lifetime of a newly made CA (and of the webhook's serving certificate)."""
    rotate_before: dt.timedelta
    """A CA with less than this left is replaced."""

    @classmethod
    def days(cls, validity: int, rotate_before: int) -> CaPolicy:
        if validity <= rotate_before:
            raise ValueError(f"CA validity ({validity} days) must exceed the rotation margin "
                             f"({rotate_before} days), or every CA would be rotated at once")
        return cls(dt.timedelta(days=validity), dt.timedelta(days=rotate_before))


# -- small readers --------------------------------------------------------------------


def is_managed(obj: Mapping[str, Any] | None) -> bool:
    labels = ((obj or {}).get("metadata") or {}).get("labels") or {}
    return bool(labels.get(MANAGED_BY) == "podtally")


def labels_of(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})


def name_of(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


def namespace_of(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("namespace", ""))


def wants_ca(namespace: str, labels: Mapping[str, str], *, operator_namespace: str,
             has_opted_in_pods: bool = False) -> bool:
    """An opted-in namespace — or one holding pods that opt in on their own (the pod wins
    over the namespace, and an injected pod mounts the namespace's CA) — that is not one the
    webhook never injects into."""
    opted_in = labels.get(INJECT_KEY) == NAMESPACE_ENABLED or has_opted_in_pods
    return opted_in and namespace not in ALWAYS_EXCLUDED and namespace != operator_namespace


def is_terminating(namespace_obj: Mapping[str, Any]) -> bool:
    """Nothing can be created in a namespace being deleted; its contents go with it."""
    return bool((namespace_obj.get("status") or {}).get("phase") == "Terminating"
                or (namespace_obj.get("metadata") or {}).get("deletionTimestamp"))


def split_certs(pem: bytes) -> list[bytes]:
    return [m.group(0) + b"\n" for m in _PEM_CERT.finditer(pem)]


def secret_bytes(secret: Mapping[str, Any] | None, key: str) -> bytes:
    value = ((secret or {}).get("data") or {}).get(key)
    return base64.b64decode(value) if value else b""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unexpired(pems: Iterable[bytes], now: dt.datetime) -> list[bytes]:
    out: list[bytes] = []
    for pem in pems:
        try:
            if certs.cert_not_after(pem) > now:
                out.append(pem)
        except ValueError:
            continue  # not a certificate: dropped
    return out


def _valid_pair(cert_pem: bytes, key_pem: bytes) -> bool:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        return bool(certs.load_certificate(cert_pem).public_key() == key.public_key())
    except (ValueError, TypeError):
        return False


def _metadata(name: str, namespace: str, component: str,
              current: Mapping[str, Any] | None) -> Obj:
    meta: Obj = {"name": name, "namespace": namespace,
                 "labels": {**MANAGED_LABELS, COMPONENT: component}}
    rv = ((current or {}).get("metadata") or {}).get("resourceVersion")
    if rv:  # a replace is optimistic: it fails if someone changed the object since we read it
        meta["resourceVersion"] = rv
    return meta


# -- namespace CA and trust bundle ----------------------------------------------------


@dataclass(frozen=True)
class NamespaceCa:
    cert: bytes
    key: bytes
    previous: tuple[bytes, ...]  # replaced CAs, not yet expired


def read_ca(secret: Mapping[str, Any] | None) -> NamespaceCa | None:
    cert, key = secret_bytes(secret, "tls.crt"), secret_bytes(secret, "tls.key")
    if not cert or not key:
        return None
    return NamespaceCa(cert, key, tuple(split_certs(secret_bytes(secret, PREVIOUS_KEY))))


def ca_secret(name: str, namespace: str, ca: NamespaceCa,
              current: Mapping[str, Any] | None = None) -> Obj:
    data = {"tls.crt": _b64(ca.cert), "tls.key": _b64(ca.key)}
    if ca.previous:
        data[PREVIOUS_KEY] = _b64(b"".join(ca.previous))
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": _metadata(name, namespace, "namespace-ca", current), "data": data}


def desired_ca_secret(
    current: Mapping[str, Any] | None, *, name: str, namespace: str, policy: CaPolicy,
    now: dt.datetime,
) -> Obj | None:
    """The Secret to write, or None when `current` is fine (or is someone else's).

    A new CA when there is none, when ours is unreadable, or when it has less than
    `policy.rotate_before` left; expired previous CAs are dropped."""
    if current is not None and not is_managed(current):
        return None
    ca = read_ca(current)
    if ca is None or not _valid_pair(ca.cert, ca.key):
        fresh = _new_ca(namespace, policy, now)
        return ca_secret(name, namespace, NamespaceCa(*fresh, ()), current)
    if certs.needs_rotation(ca.cert, now, policy.rotate_before):
        fresh = _new_ca(namespace, policy, now)
        previous = tuple(_unexpired((ca.cert, *ca.previous), now))
        return ca_secret(name, namespace, NamespaceCa(*fresh, previous), current)
    previous = tuple(_unexpired(ca.previous, now))
    wanted = ca_secret(name, namespace, NamespaceCa(ca.cert, ca.key, previous), current)
    return None if _same(current, wanted) else wanted


def _new_ca(namespace: str, policy: CaPolicy, now: dt.datetime) -> tuple[bytes, bytes]:
    return certs.generate_ca(f"podtally CA for namespace {namespace}"[:64],
                             valid_days=max(1, policy.validity.days), now=now)


def trust_bundle(
    name: str, namespace: str, *, system_cas: bytes, ca_secret_obj: Mapping[str, Any],
    now: dt.datetime, current: Mapping[str, Any] | None = None,
) -> Obj:
    """The ConfigMap apps trust: the system CAs, then the namespace's CA, then the CAs it
    replaced that have not yet expired."""
    ca = read_ca(ca_secret_obj)
    ours: list[bytes] = []
    if ca is not None:
        ours = [ca.cert, *_unexpired(ca.previous, now)]
    system = system_cas.rstrip(b"\n") + b"\n" if system_cas.strip() else b""
    body = system + b"".join(p if p.endswith(b"\n") else p + b"\n" for p in ours)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _metadata(name, namespace, "trust-bundle", current),
            "data": {BUNDLE_KEY: body.decode("utf-8", errors="replace")}}


def desired_trust_bundle(current: Mapping[str, Any] | None, wanted: Obj) -> Obj | None:
    if current is not None and not is_managed(current):
        return None
    return None if _same(current, wanted) else wanted


def _same(current: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> bool:
    if current is None:
        return False
    have_labels = labels_of(current)
    return bool(
        current.get("data") == wanted.get("data")
        and all(have_labels.get(k) == v for k, v in labels_of(wanted).items())
    )


# -- webhook serving certificate ------------------------------------------------------


def webhook_dns_names(service: str, namespace: str) -> list[str]:
    base = f"{service}.{namespace}.svc"
    return [base, f"{base}.cluster.local", f"{service}.{namespace}", service]


def desired_webhook_tls(
    current: Mapping[str, Any] | None, *, service: str, namespace: str, policy: CaPolicy,
    now: dt.datetime,
) -> Obj | None:
    """Secret `podtally-webhook-tls`: tls.crt/tls.key (serving), ca.crt (what the API server
    trusts: current CA + unexpired previous), ca.key. None when `current` is fine."""
    if current is not None and not is_managed(current):
        return None
    ca_bundle = split_certs(secret_bytes(current, "ca.crt"))
    ca_cert = ca_bundle[0] if ca_bundle else b""
    ca_key = secret_bytes(current, "ca.key")
    previous = _unexpired(ca_bundle[1:], now)
    if not ca_cert or not _valid_pair(ca_cert, ca_key):
        ca_cert, ca_key = _new_webhook_ca(policy, now)
        previous = []
    elif certs.needs_rotation(ca_cert, now, policy.rotate_before):
        previous = _unexpired([ca_cert, *previous], now)
        ca_cert, ca_key = _new_webhook_ca(policy, now)

    names = webhook_dns_names(service, namespace)
    cert, key = secret_bytes(current, "tls.crt"), secret_bytes(current, "tls.key")
    if not _serving_ok(cert, key, ca_cert, names, policy, now):
        cert, key = certs.issue_server_cert(ca_cert, ca_key, names,
                                            valid_days=max(1, policy.validity.days), now=now)
    wanted = {
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": _metadata(WEBHOOK_TLS_SECRET, namespace, "webhook-tls", current),
        "data": {"tls.crt": _b64(cert), "tls.key": _b64(key),
                 "ca.crt": _b64(b"".join([ca_cert, *previous])), "ca.key": _b64(ca_key)},
    }
    return None if _same(current, wanted) else wanted


def _new_webhook_ca(policy: CaPolicy, now: dt.datetime) -> tuple[bytes, bytes]:
    return certs.generate_ca("podtally webhook CA", valid_days=max(1, policy.validity.days),
                             now=now)


def _serving_ok(cert: bytes, key: bytes, ca_cert: bytes, names: Sequence[str],
                policy: CaPolicy, now: dt.datetime) -> bool:
    if not cert or not _valid_pair(cert, key):
        return False
    leaf, ca = certs.load_certificate(cert), certs.load_certificate(ca_cert)
    if leaf.issuer != ca.subject:
        return False
    try:
        leaf.verify_directly_issued_by(ca)
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    if sorted(sans.get_values_for_type(x509.DNSName)) != sorted(names):
        return False
    return not certs.needs_rotation(cert, now, policy.rotate_before)


def ca_bundle_patch(webhook_config: Mapping[str, Any], ca_pem: bytes) -> list[Obj]:
    """RFC 6902 ops setting caBundle on every webhook that lacks it; each guarded by a `test`
    of the webhook's name, so a concurrent reorder fails instead of patching the wrong one."""
    want = _b64(ca_pem)
    ops: list[Obj] = []
    for i, hook in enumerate(webhook_config.get("webhooks") or []):
        client = hook.get("clientConfig") or {}
        if client.get("caBundle") == want:
            continue
        ops.append({"op": "test", "path": f"/webhooks/{i}/name", "value": hook.get("name")})
        if "clientConfig" not in hook:
            ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig",
                        "value": {"caBundle": want}})
        else:
            ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle",
                        "value": want})
    return ops


# -- pods that should have been injected ----------------------------------------------


def should_have_sidecar(pod: Mapping[str, Any], namespace: str, namespace_labels:
                        Mapping[str, str], *, operator_namespace: str) -> bool:
    """A running pod the webhook would inject now but that has no podtally status: created
    before the namespace opted in, or while the webhook was down (it fails open)."""
    if (pod.get("status") or {}).get("phase") != "Running":
        return False
    if STATUS_ANNOTATION in ((pod.get("metadata") or {}).get("annotations") or {}):
        return False
    return decide(pod, namespace, namespace_labels,
                  operator_namespace=operator_namespace).inject


def count_uninjected(pods: Iterable[Mapping[str, Any]], namespace: str,
                     namespace_labels: Mapping[str, str], *, operator_namespace: str) -> int:
    return sum(should_have_sidecar(p, namespace, namespace_labels,
                                   operator_namespace=operator_namespace) for p in pods)
