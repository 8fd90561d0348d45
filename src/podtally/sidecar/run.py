"""Runs the sidecar: mitmproxy with podtally's addons, the metrics server, and the drain.

Shutdown contract (short-lived pods lose nothing): on SIGTERM the proxy keeps serving, in-
flight calls finish, and the process exits once every counted call has been scraped by
Prometheus at least once — or when `drain_timeout` runs out, whichever comes first.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

import certifi
from mitmproxy import options
from mitmproxy.addons import core, errorcheck, proxyserver, tlsconfig
from mitmproxy.master import Master
from prometheus_client import CollectorRegistry

from podtally.certs import write_mitmproxy_confdir
from podtally.identity import identity_from, read_labels
from podtally.metrics import Meters
from podtally.metrics_server import MetricsServer
from podtally.pricing import PriceBook, PricingConfigError
from podtally.sidecar.addon import MeterAddon, PodtallyNextLayer
from podtally.sidecar.settings import SidecarSettings
from podtally.usage import UsageRecord

log = logging.getLogger("podtally.sidecar")


def trust_bundle(settings: SidecarSettings, into: Path) -> Path:
    """System CAs plus --upstream-ca-bundle, as one file for upstream TLS verification."""
    system = settings.system_ca_bundle
    if not system.exists():
        system = Path(certifi.where())
    parts = [system.read_bytes()]
    if settings.upstream_ca_bundle is not None:
        parts.append(settings.upstream_ca_bundle.read_bytes())
    bundle = into / "upstream-trust.pem"
    bundle.write_bytes(b"\n".join(parts))
    return bundle


class JsonLines:
    """One JSON usage record per line on stdout (the pod's log stream)."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.lock = threading.Lock()

    def write(self, rec: UsageRecord) -> None:
        line = rec.model_dump_json() + "\n"
        with self.lock:
            self.out.write(line)
            self.out.flush()


async def serve(
    settings: SidecarSettings, prices: PriceBook, *, out: IO[str] = sys.stdout
) -> int:
    identity = identity_from(os.environ, read_labels(settings.labels_file), settings.team_labels)
    meters = Meters(CollectorRegistry(), zero_first=settings.zero_first)
    records = JsonLines(out)

    def sink(rec: UsageRecord) -> None:
        meters.observe(rec)
        records.write(rec)

    hosts = settings.host_table()
    meter = MeterAddon(
        hosts=hosts,
        identity=identity,
        prices=prices,
        sink=sink,
        on_fault=lambda stage: meters.faults.labels(stage).inc(),
        inject_stream_usage=settings.inject_stream_usage,
    )
    # mitmproxy's confdir holds a copy of the CA key: private, and gone when we exit.
    tmp = tempfile.TemporaryDirectory(prefix="podtally-")
    confdir = Path(tmp.name)
    write_mitmproxy_confdir(
        settings.ca_cert.read_bytes(), settings.ca_key.read_bytes(), confdir
    )
    opts = options.Options(
        mode=[f"{settings.mode}@{settings.port}"],
        listen_host=settings.listen_host,
        confdir=str(confdir),
        ssl_verify_upstream_trusted_ca=str(trust_bundle(settings, confdir)),
    )
    master = Master(opts, with_termlog=False)
    # A curated addon chain: only what proxying needs; our layer choice precedes the default.
    master.addons.add(
        core.Core(),
        proxyserver.Proxyserver(),
        PodtallyNextLayer(hosts),
        tlsconfig.TlsConfig(),
        meter,
        errorcheck.ErrorCheck(),
    )
    opts.update(connection_strategy="lazy")

    draining = asyncio.Event()
    metrics = MetricsServer(
        settings.metrics_host, settings.metrics_port, meters.scrape,
        ready=lambda: meter.ready and not draining.is_set(),
    )
    metrics.start()
    loop = asyncio.get_running_loop()

    async def drain() -> None:
        deadline = time.monotonic() + settings.drain_timeout
        log.info("SIGTERM: draining (%d in flight)", meter.in_flight)
        while time.monotonic() < deadline:
            if meter.in_flight == 0 and meters.everything_scraped():
                break
            await asyncio.sleep(0.05)
        else:
            log.warning("drain timeout: %d in flight, %d calls not yet scraped",
                        meter.in_flight, meters.pending)
        master.shutdown()

    def on_signal() -> None:
        if not draining.is_set():
            draining.set()
            loop.create_task(drain())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    log.info("podtally sidecar: %s proxy on :%d, metrics on :%d, pod %s/%s",
             settings.mode, settings.port, settings.metrics_port,
             identity.namespace, identity.pod)
    try:
        await master.run()
    finally:
        metrics.stop()
        tmp.cleanup()
    return 0


def main(settings: SidecarSettings) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)
    try:
        prices = PriceBook(overrides_path=settings.price_overrides)
    except PricingConfigError as err:
        log.error("%s", err)
        return 2
    return asyncio.run(serve(settings, prices))
