"""Runs the node agent: the probes, the pod watch, the metrics server, and a clean exit.

One thread polls the ring buffer and does everything an event leads to (HTTP reassembly,
parsing, records, metrics); the pod watch, the host-name resolver and the metrics server
have threads of their own. SIGTERM/SIGINT: calls in flight are recorded as cut short, every
probe is detached, and the process exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from podtally.ebpf.attribution import (
    PodIndex,
    PodInfo,
    cgroup_dirs,
    cgroup_path,
    node_identity,
)
from podtally.ebpf.coverage import EndpointTable, classify
from podtally.ebpf.events import KIND_NAMES, ConnectEvent, DataEvent, Task, decode
from podtally.ebpf.settings import AgentSettings
from podtally.ebpf.tracker import Tracker
from podtally.metrics import Meters
from podtally.metrics_server import MetricsServer
from podtally.pricing import PriceBook, PricingConfigError
from podtally.records import CallFacts, build_record
from podtally.usage import Identity

log = logging.getLogger("podtally.ebpf")

_CGROUP_CACHE = 65536  # cgroup id → path entries kept (LRU)
DRAIN_SECONDS = 1.0  # the slow timer; a quarter-full ring wakes the agent at once
CGROUP_WALK_SECONDS = 1.0  # at most one walk of the cgroup tree per second
TICK_SECONDS = 5.0  # lost-event counters, idle connections, the clock offset
BUSY_RECORDS = 256


class Agent:
    def __init__(self, settings: AgentSettings, prices: PriceBook, *,
                 out: IO[str] = sys.stdout) -> None:
        self.settings = settings
        self.prices = prices
        self.out = out
        self.registry = CollectorRegistry()
        self.meters = Meters(self.registry, zero_first=settings.zero_first, connections=True)
        self.hosts = settings.host_table()
        self.endpoints = EndpointTable(settings.endpoints())
        self.pods = PodIndex(settings.team_labels)
        self.events: dict[str, int] = {}
        self.lost: dict[str, int] = {}
        self.skipped_cgroups: set[int] = set()
        self.ignored_connections = 0  # TLS connections the kernel was told not to copy
        self._cgroups: OrderedDict[int, str] = OrderedDict()
        self._cgroup_root = _cgroup2_mount()
        self._cgroup_walked = -CGROUP_WALK_SECONDS
        self._cgroup_ids: dict[int, str] = {}  # the last walk of the cgroup tree
        self._who: dict[int, tuple[int, PodInfo | None]] = {}
        self._node_ids: dict[tuple[str, str], Identity] = {}
        self._out_lock = threading.Lock()
        self._stop = threading.Event()
        self._offset = 0.0
        self.probes: Any = None
        self._discovery: Any = None
        self.watcher: Any = None
        self.tracker = Tracker(self.hosts, self._on_facts, self._fault,
                               epoch_of=self._epoch_of,
                               max_connections=settings.max_connections,
                               on_ignore=self._ignore_connection)
        self.registry.register(_AgentCollector(self))

    # -- clocks ---------------------------------------------------------------------------

    def _sync_clock(self) -> None:
        self._offset = time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)

    def _epoch_of(self, ts_ns: int) -> float:
        return ts_ns / 1e9 + self._offset

    # -- events ---------------------------------------------------------------------------

    def on_record(self, raw: bytes) -> None:
        try:
            ev = decode(raw)
            if ev is None:
                return
            if isinstance(ev, ConnectEvent):
                self._count("connect")
                self._on_connect(ev)
                return
            self._count(KIND_NAMES.get(ev.kind, "other"))
            self._on_data(ev)
        except Exception:  # noqa: BLE001 - one bad event never stops the agent
            log.exception("event handling fault")
            self._fault("event")

    def _count(self, kind: str) -> None:
        self.events[kind] = self.events.get(kind, 0) + 1

    def _on_data(self, ev: DataEvent) -> None:
        pod = self._pod_of(ev.task)
        if pod is not None and pod.has_sidecar:
            # Its sidecar meters this pod; tell the kernel to stop copying its plaintext.
            if ev.task.cgroup not in self.skipped_cgroups and self.probes is not None:
                self.probes.skip_cgroup(ev.task.cgroup)
                self.skipped_cgroups.add(ev.task.cgroup)
            return
        self.tracker.on_event(ev)

    def _ignore_connection(self, pid: int, conn: int) -> None:
        self.ignored_connections += 1
        if self.probes is not None:
            self.probes.ignore_connection(pid, conn)

    def _on_connect(self, ev: ConnectEvent) -> None:
        provider = self.endpoints.provider_for(ev.address, ev.port)
        if provider is None:
            return
        pod = self._pod_of(ev.task)
        via = classify(ev.task.uid, pod, ev.address, ev.port,
                       proxy_uid=self.settings.proxy_uid)
        self.meters.count_connection(self._identity(ev.task, pod), provider, via)

    def _on_facts(self, task: Task, facts: CallFacts) -> None:
        rec = build_record(self._identity(task, self._pod_of(task)), self.prices, facts)
        self.meters.observe(rec)
        if self.settings.records:
            line = rec.model_dump_json() + "\n"
            with self._out_lock:
                self.out.write(line)
                self.out.flush()

    def _fault(self, stage: str) -> None:
        self.meters.faults.labels(stage).inc()

    # -- attribution ----------------------------------------------------------------------

    def _cgroup_path(self, task: Task) -> str:
        path = self._cgroups.get(task.cgroup)
        if path is None:
            try:
                path = cgroup_path(Path(f"/proc/{task.pid}/cgroup").read_text())
            except OSError:
                # The process is gone (the agent reads its events up to a second late):
                # its cgroup, by id, in the cgroup tree; else try again with its next event.
                path = self._cgroup_by_id(task.cgroup)
                if path is None:
                    return "/"
            self._cgroups[task.cgroup] = path
            if len(self._cgroups) > _CGROUP_CACHE:
                self._cgroups.popitem(last=False)
        return path

    def _cgroup_by_id(self, cgroup_id: int) -> str | None:
        path = self._cgroup_ids.get(cgroup_id)
        now = time.monotonic()
        if (path is None and self._cgroup_root is not None
                and now - self._cgroup_walked >= CGROUP_WALK_SECONDS):
            self._cgroup_walked = now
            self._cgroup_ids = cgroup_dirs(self._cgroup_root)
            path = self._cgroup_ids.get(cgroup_id)
        return path

    def _pod_of(self, task: Task) -> PodInfo | None:
        cached = self._who.get(task.cgroup)
        if cached is not None and cached[0] == self.pods.generation:
            return cached[1]
        pod = self.pods.lookup(self._cgroup_path(task))
        if len(self._who) > _CGROUP_CACHE:
            self._who.clear()
        self._who[task.cgroup] = (self.pods.generation, pod)
        return pod

    def _identity(self, task: Task, pod: PodInfo | None) -> Identity:
        if pod is not None:
            return pod.identity
        key = (task.comm, self._cgroup_path(task))
        who = self._node_ids.get(key)
        if who is None:
            if len(self._node_ids) > _CGROUP_CACHE:
                self._node_ids.clear()
            who = self._node_ids[key] = node_identity(*key)
        return who

    # -- coverage: LLM host names → addresses ---------------------------------------------

    def resolve_hosts(self) -> None:
        resolved: dict[tuple[str, int], str] = {}
        for host, provider in self.hosts.exact_hosts().items():
            try:
                infos = socket.getaddrinfo(host, 443, proto=socket.IPPROTO_TCP)
            except OSError:
                continue
            for info in infos:
                resolved[(str(info[4][0]), 443)] = provider
        self.endpoints.set_resolved(resolved)

    def _resolver(self) -> None:
        while not self._stop.is_set():
            self.resolve_hosts()
            self._stop.wait(self.settings.resolve_seconds)

    # -- lifecycle ------------------------------------------------------------------------

    def attach(self) -> list[str]:
        from podtally.ebpf.loader import Discovery, target_for

        targets = [t for t in (target_for(str(p)) for p in self.settings.libssl) if t]
        if self.settings.discover:
            if self._discovery is None:
                self._discovery = Discovery()
            targets += self._discovery.scan()
        return list(self.probes.attach(targets))

    def start(self) -> None:
        from podtally.ebpf.loader import Probes

        self._sync_clock()
        self.probes = Probes(self.on_record, ringbuf_pages=self.settings.ringbuf_pages,
                             proxy_uid=self.settings.proxy_uid,
                             cgroup_scope=self.settings.cgroup,
                             fast=self.settings.fast_probes)
        self._log_attached(self.attach())
        if self.settings.kubernetes:
            self._start_watch()
        threading.Thread(target=self._resolver, name="resolver", daemon=True).start()

    def _log_attached(self, paths: list[str]) -> None:
        from podtally.ebpf.loader import target_for

        for path in paths:
            t = target_for(path)
            fast = t is not None and self.probes.fast_paths.get(t.key, False)
            log.info("attached to %s (%s)", path,
                     "internal write/read functions" if fast else "public SSL_* symbols")

    def _start_watch(self) -> None:
        from podtally.control.kube import Kube
        from podtally.ebpf.pods import PodWatcher

        s = self.settings
        if s.api_server:
            kube = Kube.for_host(s.api_server)
        elif s.kubeconfig or os.environ.get("KUBERNETES_SERVICE_HOST"):
            kube = Kube.from_environment(str(s.kubeconfig) if s.kubeconfig else None)
        else:
            log.info("no Kubernetes API server: processes are labelled by command and cgroup")
            return
        self.watcher = PodWatcher(kube, self.pods, node=s.node_name)
        self.watcher.start()

    def ready(self) -> bool:
        return (self.probes is not None and bool(self.probes.attached)
                and (self.watcher is None or self.watcher.synced.is_set()))

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        metrics = MetricsServer(self.settings.metrics_host, self.settings.metrics_port,
                                self.meters.scrape, ready=self.ready)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())
        serving = False
        try:
            try:
                self.start()
            except Exception as exc:  # noqa: BLE001 - bcc raises plain Exception
                log.error("cannot load the probes: %s (needs root or CAP_BPF+CAP_PERFMON, "
                          "kernel headers in /lib/modules/$(uname -r)/build, tracefs at "
                          "/sys/kernel/tracing: see `make ebpf-deps`)", exc)
                return 1
            metrics.start()
            serving = True
            log.info("podtally ebpf-agent: %d file(s) attached, metrics on :%d",
                     len(self.probes.attached), metrics.port)
            next_tick = next_scan = time.monotonic()
            while not self._stop.is_set():
                # The kernel wakes nobody per event (BPF_RB_NO_WAKEUP) but once a quarter of
                # the ring is queued (probes.c); else drain every second: on this VM each
                # wake-up costs ~50 µs of CPU, and every 100 ms it cost 0.2% of a core idle
                # and ~0.3% at 100 req/s (cold caches for a few records). Busy: drain again.
                if self.probes.drain() < BUSY_RECORDS:
                    self.probes.wait(DRAIN_SECONDS)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + TICK_SECONDS
                    self._sync_clock()
                    self.tracker.expire(time.clock_gettime_ns(time.CLOCK_MONOTONIC))
                if self.settings.discover and now >= next_scan:
                    next_scan = now + self.settings.rescan_seconds
                    self._log_attached(self.attach())
            self.probes.drain()  # what the kernel already queued
            self.lost = self.probes.lost()
            self.tracker.close_all(time.clock_gettime_ns(time.CLOCK_MONOTONIC))
        finally:
            if serving:
                metrics.stop()  # first: a scrape reads the probes' maps
            if self.watcher is not None:
                self.watcher.stop()
            if self.probes is not None:
                self.probes.close()
        log.info("podtally ebpf-agent: detached, exiting")
        return 0


def _cgroup2_mount() -> str | None:
    """Where this process sees the cgroup v2 hierarchy (its cgroup namespace's root, as
    `/proc/<pid>/cgroup` paths are)."""
    try:
        mounts = Path("/proc/self/mounts").read_text()
    except OSError:
        return None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            return parts[1]
    return None


class _AgentCollector(Collector):
    """The agent's own health: events seen and lost, what is attached and tracked."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        a = self.agent
        seen = CounterMetricFamily("podtally_ebpf_events", "Kernel events received, by kind.",
                                   labels=["kind"])
        for kind, n in sorted(dict(a.events).items()):
            seen.add_metric([kind], n)
        yield seen
        lost = CounterMetricFamily(
            "podtally_ebpf_lost_events",
            "Kernel events dropped because the ring buffer (or a map) was full, by kind.",
            labels=["kind"])
        if a.probes is not None:
            # Read at scrape time: map reads are plain bpf() syscalls on the map's fd.
            with contextlib.suppress(Exception):  # closing down: the last values stand
                a.lost = a.probes.lost()
        for kind in ("write", "read", "close", "connect", "truncated", "call_args"):
            lost.add_metric([kind], a.lost.get(kind, 0))
        yield lost
        yield CounterMetricFamily(
            "podtally_ebpf_ignored_connections",
            "TLS connections seen to carry no LLM calls (another host, HTTP/2), whose "
            "plaintext the kernel stopped copying.", value=a.ignored_connections)
        unparsed = CounterMetricFamily(
            "podtally_ebpf_unparsed_connections",
            "TLS connections whose plaintext could not be followed (http2, unparsed).",
            labels=["reason"])
        for reason, n in sorted(dict(a.tracker.unparsed).items()):
            unparsed.add_metric([reason], n)
        yield unparsed
        attached = a.probes.attached if a.probes is not None else {}
        yield GaugeMetricFamily("podtally_ebpf_attached_files",
                                "Files (libssl, static binaries) with uprobes attached.",
                                value=len(attached))
        yield GaugeMetricFamily("podtally_ebpf_tracked_connections",
                                "TLS connections followed right now.", value=len(a.tracker))
        yield GaugeMetricFamily("podtally_ebpf_pods", "Pods of this node known to the agent.",
                                value=len(a.pods))


def main(settings: AgentSettings) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        prices = PriceBook(overrides_path=settings.price_overrides)
    except PricingConfigError as err:
        log.error("%s", err)
        return 2
    return Agent(settings, prices).run()
