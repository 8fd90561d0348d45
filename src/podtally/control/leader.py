"""Leader election on a coordination.k8s.io/v1 Lease, the way client-go does it.

Only the leader reconciles (the webhook serves on every replica). A candidate takes the Lease
when it is free, or when its record has not changed for `lease_duration` *by the candidate's
own clock* (clocks of different nodes are never compared). Writes are optimistic replaces:
of two candidates racing for an expired Lease, one gets a Conflict and stays a follower. A
leader that cannot renew for `renew_deadline` (< lease_duration) stops acting as one before
anyone else may take over.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from podtally.control.kube import Conflict, Kube, KubeError

log = logging.getLogger("podtally.operator.leader")

Obj = dict[str, Any]
MICROTIME = "%Y-%m-%dT%H:%M:%S.%fZ"  # metav1.MicroTime


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def microtime(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime(MICROTIME)


def holder_of(lease: Mapping[str, Any] | None) -> str:
    return str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")


def next_lease(
    current: Mapping[str, Any] | None, *, identity: str, namespace: str, name: str,
    now: dt.datetime, lease_seconds: int, holder_expired: bool,
) -> Obj | None:
    """The Lease `identity` should write to lead, or None while someone else holds it. Pure."""
    spec = dict((current or {}).get("spec") or {})
    holder = str(spec.get("holderIdentity") or "")
    if holder and holder != identity and not holder_expired:
        return None
    stamp = microtime(now)
    if holder == identity:
        acquired, transitions = spec.get("acquireTime") or stamp, spec.get("leaseTransitions", 0)
    else:
        acquired = stamp
        transitions = int(spec.get("leaseTransitions", 0)) + (1 if current is not None else 0)
    meta: Obj = {"name": name, "namespace": namespace,
                 "labels": {"app.kubernetes.io/managed-by": "podtally"}}
    rv = ((current or {}).get("metadata") or {}).get("resourceVersion")
    if rv:
        meta["resourceVersion"] = rv
    return {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta,
        "spec": {"holderIdentity": identity, "leaseDurationSeconds": lease_seconds,
                 "acquireTime": acquired, "renewTime": stamp,
                 "leaseTransitions": int(transitions)},
    }


class LeaderElector:
    def __init__(
        self, kube: Kube, *, namespace: str, name: str, identity: str,
        lease_duration: float = 15.0, renew_deadline: float = 10.0, retry_period: float = 2.0,
        clock: Callable[[], dt.datetime] = _now,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        if not retry_period < renew_deadline < lease_duration:
            raise ValueError("want retry_period < renew_deadline < lease_duration")
        self.kube, self.namespace, self.name, self.identity = kube, namespace, name, identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.clock = clock
        self.on_change = on_change
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = clock()
        self._renewed_at: dt.datetime | None = None
        self._was_leader = False
        self._lock = threading.Lock()

    def is_leader(self) -> bool:
        with self._lock:
            return self._leading(self.clock())

    def _leading(self, now: dt.datetime) -> bool:
        return (self._renewed_at is not None and
                (now - self._renewed_at).total_seconds() < self.renew_deadline)

    def try_acquire_or_renew(self) -> bool:
        """One round: read the Lease, take or renew it if allowed. True while leading."""
        with self._lock:
            now = self.clock()
            try:
                self._round(now)
            except KubeError as err:
                log.warning("leader election: %s", err)
            leading = self._leading(now)
            changed = leading != self._was_leader
            self._was_leader = leading
        if changed:
            log.info("%s %s leadership of lease %s/%s", self.identity,
                     "acquired" if leading else "lost", self.namespace, self.name)
            if self.on_change:
                self.on_change(leading)
        return leading

    def _round(self, now: dt.datetime) -> None:
        current = self.kube.get_lease(self.namespace, self.name)
        record = _record(current)
        if record != self._observed:
            self._observed, self._observed_at = record, now
        # The holder's own declared duration, measured from when *we* saw the record change.
        declared = ((current or {}).get("spec") or {}).get("leaseDurationSeconds")
        duration = float(declared) if declared else self.lease_duration
        expired = (now - self._observed_at).total_seconds() >= duration
        wanted = next_lease(current, identity=self.identity, namespace=self.namespace,
                            name=self.name, now=now, lease_seconds=round(self.lease_duration),
                            holder_expired=expired)
        if wanted is None:
            self._renewed_at = None  # someone else leads
            return
        try:
            written = (self.kube.create_lease(wanted) if current is None
                       else self.kube.replace_lease(wanted))
        except Conflict:
            self._renewed_at = None  # another candidate won the race
            return
        self._observed, self._observed_at = _record(written), now
        self._renewed_at = now

    def release(self) -> None:
        """Step down at shutdown: clear the holder so a follower need not wait for expiry."""
        with self._lock:
            if self._renewed_at is None:
                return
            self._renewed_at = None
            self._was_leader = False
            try:
                current = self.kube.get_lease(self.namespace, self.name)
                if holder_of(current) != self.identity or current is None:
                    return
                spec = {k: v for k, v in (current.get("spec") or {}).items()
                        if k != "holderIdentity"}
                spec.update(leaseDurationSeconds=1, renewTime=microtime(self.clock()))
                self.kube.replace_lease({**current, "spec": spec})
            except KubeError as err:
                log.warning("leader election: releasing the lease: %s", err)

    def run(self, stop: threading.Event) -> None:
        """Renew every `retry_period` until `stop`, then release."""
        while not stop.is_set():
            started = time.monotonic()
            self.try_acquire_or_renew()
            stop.wait(max(0.0, self.retry_period - (time.monotonic() - started)))
        self.release()


def _record(lease: Mapping[str, Any] | None) -> tuple[Any, ...] | None:
    if lease is None:
        return None
    spec = lease.get("spec") or {}
    return (spec.get("holderIdentity"), spec.get("renewTime"), spec.get("acquireTime"),
            spec.get("leaseTransitions"), spec.get("leaseDurationSeconds"))
