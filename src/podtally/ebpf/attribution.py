"""Who a process is: pid → cgroup path → container and pod → the contract's identity.

Pure: the agent reads `/proc/<pid>/cgroup` and the API server, and hands the text and the
pod objects to these functions. Kubelet names a pod's cgroup after the pod's UID
(`…pod<uid>.slice`, `…/pod<uid>/`) and each container's after its container id
(`cri-containerd-<id>.scope`, `docker-<id>.scope`, `crio-<id>`, or the bare id), on both
cgroup drivers and both cgroup versions. A process in no pod's cgroup is a node process:
labelled by its command name and cgroup, never left out.
"""

from __future__ import annotations

import ipaddress
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from podtally.identity import APP_LABELS, DEFAULT_TEAM_LABELS, UNATTRIBUTED, first_present
from podtally.injection.workload import resolve_workload
from podtally.usage import Identity

SIDECAR_CONTAINER = "podtally-sidecar"
INIT_CONTAINER = "podtally-init"
DEFAULT_REDIRECT_PORTS = frozenset({443, 80})
DEFAULT_PROXY_UID = 1337
NODE_NAMESPACE = ""  # the namespace label of processes outside any pod

_POD_UID = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
_CONTAINER_ID = re.compile(r"(?:^|[/-])([0-9a-f]{64})(?:\.scope)?$")


def cgroup_path(proc_cgroup: str) -> str:
    """The process' cgroup from `/proc/<pid>/cgroup`: the v2 entry (`0::`), else the first
    v1 entry that names a pod, else the first entry."""
    entries = [line.split(":", 2) for line in proc_cgroup.splitlines() if line.count(":") >= 2]
    for hid, _, path in entries:
        if hid == "0" and path not in ("", "/"):
            return path
    for _, _, path in entries:
        if _POD_UID.search(path):
            return path
    return entries[0][2] if entries else "/"


def cgroup_dirs(root: str) -> dict[int, str]:
    """cgroup v2 id → path (as `/proc/<pid>/cgroup` gives it) of every cgroup under the
    hierarchy mounted at `root`: a cgroup's id is its directory's inode number. For a
    process that is gone by the time its events are read."""
    out: dict[int, str] = {}
    stack = [(root, "")]
    while stack:
        top, rel = stack.pop()
        try:
            out[os.stat(top).st_ino] = rel or "/"
            with os.scandir(top) as it:
                stack.extend((e.path, f"{rel}/{e.name}") for e in it
                             if e.is_dir(follow_symlinks=False))
        except OSError:
            continue  # removed while walking
    return out


def pod_and_container(path: str) -> tuple[str | None, str | None]:
    """(pod UID, container id) named by a cgroup path; either may be None."""
    pod = _POD_UID.search(path)
    container = _CONTAINER_ID.search(path.rstrip("/"))
    return (pod.group(1).replace("_", "-") if pod else None,
            container.group(1) if container else None)


@dataclass(frozen=True)
class PodInfo:
    uid: str
    identity: Identity
    has_sidecar: bool
    redirect_ports: frozenset[int]  # empty: every TCP port is redirected
    exclude_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    proxy_uid: int
    container_ids: frozenset[str]

    def redirects(self, address: str, port: int) -> bool:
        """Whether the pod's capture rules send a connection to (address, port) through
        its sidecar (podtally init-iptables: ports, excluded CIDRs)."""
        if not self.has_sidecar:
            return False
        if self.redirect_ports and port not in self.redirect_ports:
            return False
        ip = ipaddress.ip_address(address)
        return not any(ip in net for net in self.exclude_cidrs if net.version == ip.version)


def _args(container: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for arg in [*(container.get("command") or []), *(container.get("args") or [])]:
        if isinstance(arg, str) and arg.startswith("--") and "=" in arg:
            key, _, value = arg[2:].partition("=")
            out[key] = value
    return out


def _container_ids(pod: Mapping[str, Any]) -> frozenset[str]:
    status = pod.get("status") or {}
    ids = set()
    for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
        for cs in status.get(key) or []:
            cid = str(cs.get("containerID") or "")
            if "://" in cid:
                ids.add(cid.split("://", 1)[1])
    return frozenset(ids)


def pod_info(pod: Mapping[str, Any], namespace_labels: Mapping[str, str] | None = None,
             team_labels: Sequence[str] = DEFAULT_TEAM_LABELS) -> PodInfo:
    """A pod object (the API server's JSON) → its identity and how its traffic is metered.

    Team: the first of `team_labels` on the pod, then on its namespace (what injection
    copies onto the pod), else `unattributed` — the same answer a sidecar would give.
    """
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    labels = meta.get("labels") or {}
    namespace = str(meta.get("namespace") or "default")
    _, workload = resolve_workload(pod, namespace)
    team = (first_present(labels, team_labels)
            or first_present(namespace_labels or {}, team_labels) or UNATTRIBUTED)
    identity = Identity(
        namespace=namespace,
        pod=str(meta.get("name") or "unknown"),
        workload=workload,
        team=team,
        app=first_present(labels, APP_LABELS) or "unknown",
        service_account=str(spec.get("serviceAccountName") or "default"),
    )
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    has_sidecar = any(c.get("name") == SIDECAR_CONTAINER for c in containers)
    ports, proxy_uid = DEFAULT_REDIRECT_PORTS, DEFAULT_PROXY_UID
    cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    for c in containers:
        if c.get("name") == INIT_CONTAINER:
            args = _args(c)
            if "ports" in args:
                ports = frozenset(int(p) for p in args["ports"].split(",") if p.strip())
            if args.get("exclude-cidrs"):
                cidrs = tuple(ipaddress.ip_network(c.strip(), strict=False)
                              for c in args["exclude-cidrs"].split(",") if c.strip())
            if "proxy-uid" in args:
                proxy_uid = int(args["proxy-uid"])
    return PodInfo(uid=str(meta.get("uid") or ""), identity=identity, has_sidecar=has_sidecar,
                   redirect_ports=ports, exclude_cidrs=cidrs, proxy_uid=proxy_uid,
                   container_ids=_container_ids(pod))


def node_identity(comm: str, cgroup: str) -> Identity:
    """A process in no pod: the node's own. `workload` is its command name, `app` its
    cgroup's last component (a systemd unit, say), bounded by what runs on the node."""
    unit = cgroup.rstrip("/").rsplit("/", 1)[-1] or "/"
    return Identity(namespace=NODE_NAMESPACE, pod="", workload=comm or "unknown",
                    team=UNATTRIBUTED, app=unit, service_account="")


class PodIndex:
    """The node's pods by UID and container id; filled and kept current by a watch.

    Thread-safe: the watch thread writes, the event loop reads.
    """

    def __init__(self, team_labels: Sequence[str] = DEFAULT_TEAM_LABELS) -> None:
        self.team_labels = tuple(team_labels)
        self._lock = threading.Lock()
        self._pods: dict[str, Mapping[str, Any]] = {}
        self._info: dict[str, PodInfo] = {}
        self._by_container: dict[str, str] = {}
        self._namespaces: dict[str, dict[str, str]] = {}
        self.generation = 0  # bumped on every change: caches keyed on it go stale

    def __len__(self) -> int:
        with self._lock:
            return len(self._info)

    def replace(self, pods: Iterable[Mapping[str, Any]],
                namespaces: Iterable[Mapping[str, Any]] = ()) -> None:
        with self._lock:
            self._namespaces = {
                str((ns.get("metadata") or {}).get("name")):
                    dict((ns.get("metadata") or {}).get("labels") or {})
                for ns in namespaces
            }
            self._pods = {str((p.get("metadata") or {}).get("uid")): p for p in pods}
            self._rebuild()

    def upsert(self, pod: Mapping[str, Any]) -> None:
        """One pod added or changed (a watch event): only its own entries are recomputed."""
        uid = str((pod.get("metadata") or {}).get("uid"))
        ns = str((pod.get("metadata") or {}).get("namespace") or "default")
        with self._lock:
            self._drop(uid)
            self._pods[uid] = pod
            info = self._info[uid] = pod_info(pod, self._namespaces.get(ns), self.team_labels)
            self._by_container.update(dict.fromkeys(info.container_ids, uid))
            self.generation += 1

    def delete(self, pod: Mapping[str, Any]) -> None:
        with self._lock:
            self._drop(str((pod.get("metadata") or {}).get("uid")))
            self.generation += 1

    def _drop(self, uid: str) -> None:
        self._pods.pop(uid, None)
        old = self._info.pop(uid, None)
        if old is not None:
            for cid in old.container_ids:
                if self._by_container.get(cid) == uid:
                    del self._by_container[cid]

    def set_namespace(self, namespace: Mapping[str, Any], deleted: bool = False) -> None:
        meta = namespace.get("metadata") or {}
        with self._lock:
            if deleted:
                self._namespaces.pop(str(meta.get("name")), None)
            else:
                self._namespaces[str(meta.get("name"))] = dict(meta.get("labels") or {})
            self._rebuild()

    def _rebuild(self) -> None:
        info = {}
        for uid, pod in self._pods.items():
            ns = str((pod.get("metadata") or {}).get("namespace") or "default")
            info[uid] = pod_info(pod, self._namespaces.get(ns), self.team_labels)
        self._info = info
        self._by_container = {cid: uid for uid, p in info.items() for cid in p.container_ids}
        self.generation += 1

    def lookup(self, cgroup: str) -> PodInfo | None:
        """The pod a cgroup path belongs to, by pod UID, else by container id."""
        pod_uid, container = pod_and_container(cgroup)
        with self._lock:
            if pod_uid is not None and pod_uid in self._info:
                return self._info[pod_uid]
            if container is not None and container in self._by_container:
                return self._info[self._by_container[container]]
        return None
