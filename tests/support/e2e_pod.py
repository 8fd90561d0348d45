"""A metered pod for end-to-end tests: network namespaces, `podtally init-iptables`, the real
sidecar as uid 1337, a fake provider (and optionally a plain-HTTP one) in the provider netns.

Shared by tests/test_e2e_netns.py and tests/test_e2e_providers_netns.py::

    with metered_pod(hosts={"api.openai.com": PROVIDER_ADDR}, tls_hosts=["api.openai.com"],
                     routes=lambda release_dir: {"routes": [...]},
                     app_env={"OPENAI_API_KEY": "sk-..."}) as e2e:
        out = e2e.app(APP_CODE)        # the app, uid 1000, in the pod; prints one JSON line
        recs = e2e.wait_records(1)     # the sidecar's usage records (its stdout)
        m = e2e.metrics()              # scraped from outside the pod, as Prometheus does

Prometheus' view is taken from the provider netns at the pod address. Zero first: a call on
never-scraped series shows up at 0 on the next scrape and counts from the one after.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.fake_provider import (
    Exchange,
    make_provider_tls,
    provider_command,
    read_request_log,
    wait_ready,
)
from support.netns import (
    POD_ADDR,
    PROVIDER_ADDR,
    PROVIDER_ADDR6,
    Pod,
    UidPython,
    pod_with_provider,
    python_for_uid,
)
from support.sidecar import Sample, parse_metrics, select

from podtally.certs import generate_ca

APP_UID, PROXY_UID = 1000, 1337
METRICS_PORT = 15090
METRICS_URL = f"http://{POD_ADDR}:{METRICS_PORT}"
DRAIN_TIMEOUT = 25.0  # the sidecar's default, kept below Kubernetes' 30 s grace period

POD_ENV = {
    "POD_NAMESPACE": "shop",
    "POD_NAME": "checkout-7d9f8b6c5-x2x4z",
    "POD_SERVICE_ACCOUNT": "checkout-sa",
    "PODTALLY_WORKLOAD": "checkout",
}
# A downward-API labels volume file.
LABELS_FILE = 'app="checkout"\npod-template-hash="7d9f8b6c5"\nteam="payments"\n'
ID_LABELS = {
    "namespace": "shop",
    "workload": "checkout",
    "team": "payments",
    "app": "checkout",
    "service_account": "checkout-sa",
}
TOKEN_TYPES = ("input", "cache_read", "cache_write", "output", "reasoning")


@dataclass
class E2E:
    pod: Pod
    dir: Path
    app_python: UidPython
    provider_ca: Path
    podtally_ca: Path
    provider_log: Path
    release_dir: Path
    sidecar: subprocess.Popen[str]
    sidecar_out: Path
    sidecar_err: Path
    provider_err: Path
    ca_key_pem: bytes
    app_env: dict[str, str] = field(default_factory=dict)
    plain_log: Path | None = None  # the plain-HTTP fake provider's request log, if any
    scrapes: list[str] = field(default_factory=list)

    # -- the sidecar's outputs --

    def stderr(self) -> str:
        return self.sidecar_err.read_text(errors="replace")

    def diagnostics(self) -> str:
        rc = self.sidecar.poll()
        return (f"\n--- sidecar (exit {rc}) stderr ---\n{self.stderr()}"
                f"\n--- sidecar stdout ---\n{self.sidecar_out.read_text(errors='replace')}"
                f"\n--- fake provider stderr ---\n{self.provider_err.read_text(errors='replace')}")

    def records(self) -> list[dict[str, Any]]:
        text = self.sidecar_out.read_text()
        return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]

    def wait_records(self, n: int, timeout: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            recs = self.records()
            if len(recs) >= n:
                return recs
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(recs)} usage records, wanted {n}{self.diagnostics()}")
            time.sleep(0.02)

    def alive(self) -> None:
        assert self.sidecar.poll() is None, f"the sidecar is gone{self.diagnostics()}"

    # -- Prometheus' side: from outside the pod, at the pod's address --

    def get(self, path: str) -> tuple[int, str]:
        res = self.pod.provider.run(
            ["curl", "-sS", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}",
             f"{METRICS_URL}{path}"],
            check=False, timeout=15,
        )
        body, _, code = res.stdout.rpartition("\n")
        return int(code or 0), body

    def scrape(self) -> dict[Sample, float]:
        code, text = self.get("/metrics")
        assert code == 200, f"/metrics answered {code}{self.diagnostics()}"
        self.scrapes.append(text)
        return parse_metrics(text)

    def metrics(self) -> dict[Sample, float]:
        """Current values, staged calls included: the first scrape releases them."""
        self.scrape()
        return self.scrape()

    # -- the app --

    def app_popen(self, code: str, *args: str,
                  env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
        """Start the app (uid 1000, in the pod); `app_result` collects its JSON line."""
        script = self.dir / f"app-{abs(hash(code))}.py"
        if not script.exists():
            script.write_text(code)
            script.chmod(0o644)
        full_env = {
            **self.app_python.env,
            "SSL_CERT_FILE": str(self.podtally_ca),
            **self.app_env,
            **(env or {}),
        }
        return self.pod.popen([self.app_python.executable, str(script), *args], uid=APP_UID,
                              env=full_env)

    def app_result(self, proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"app timed out\nstdout: {out}\nstderr: {err}"
                                 f"{self.diagnostics()}") from None
        assert proc.returncode == 0, (
            f"app exited {proc.returncode}\nstdout: {out}\nstderr: {err}{self.diagnostics()}")
        return dict(json.loads(out.strip().splitlines()[-1]))

    def app(self, code: str, *args: str, timeout: float = 60,
            env: Mapping[str, str] | None = None) -> dict[str, Any]:
        return self.app_result(self.app_popen(code, *args, env=env), timeout)

    def exchanges(self) -> dict[str, Exchange]:
        """Requests the provider received, by target (the last one per target)."""
        return {ex.path: ex for ex in read_request_log(self.provider_log)}

    def nat_counters(self) -> dict[str, int]:
        """Packets per rule of podtally's nat chains (a nat rule sees each connection once)."""
        out = self.pod.run(["iptables-save", "-c", "-t", "nat"]).stdout
        counters = {}
        for line in out.splitlines():
            m = re.match(r"^\[(\d+):\d+\] -A (PODTALLY_\w+) (.*)$", line)
            if m:
                counters[f"{m[2]} {m[3]}"] = int(m[1])
        return counters


def value(m: dict[Sample, float], name: str, **labels: str) -> float | None:
    """The single sample of `name` with exactly these labels' values (others ignored)."""
    found = select(m, name, **labels)
    assert len(found) <= 1, f"{name}{labels}: several series {found}"
    return next(iter(found.values()), None)


def write_file(path: Path, data: bytes | str, mode: int = 0o644, uid: int | None = None) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)
    if uid is not None:
        os.chown(path, uid, uid)
    return path


def _start_provider(pod: Pod, argv: list[str], name: str) -> tuple[subprocess.Popen[str], Path]:
    ready = pod.provider.workdir / f"{name}.ready.json"
    err = pod.provider.workdir / f"{name}.stderr"
    proc = pod.provider.popen([*argv, "--ready-file", str(ready)],
                              stdout=subprocess.DEVNULL, stderr=err.open("w"))
    try:
        wait_ready(ready, proc)
    except (RuntimeError, TimeoutError) as exc:
        raise AssertionError(f"{exc}\n{err.read_text()}") from None
    return proc, err


@contextlib.contextmanager
def metered_pod(
    *,
    hosts: Mapping[str, str],
    tls_hosts: Sequence[str],
    routes: Callable[[Path], dict[str, Any]],
    app_env: Mapping[str, str] = {},  # noqa: B006 - read only
    provider_argv: Callable[..., list[str]] = provider_command,
    plain_routes: dict[str, Any] | None = None,
    plain_listen: Sequence[str] = (),
    init_args: Sequence[str] = (),
) -> Iterator[E2E]:
    """The pod, wired and running; everything is torn down on exit.

    `routes(release_dir)` gives the TLS fake provider's routes (release_dir: where the app,
    uid 1000, may create release files). `provider_argv` builds its command line (the
    signature of `provider_command`). With `plain_routes`, a second fake provider serves
    plain HTTP on `plain_listen` (its log: `E2E.plain_log`). `init_args` go to
    `podtally init-iptables` (e.g. `--ports=443,80,11434`).
    """
    with pod_with_provider(hosts) as pod:
        work = pod.workdir / "e2e"
        work.mkdir(mode=0o755)
        work.chmod(0o755)

        # The provider: a real HTTPS server in its own netns, cert from the provider CA.
        tls = make_provider_tls(pod.provider.workdir / "tls", hosts=list(tls_hosts),
                                ip_addresses=[PROVIDER_ADDR, PROVIDER_ADDR6])
        provider_ca = write_file(work / "provider-ca.pem", tls.ca_cert.read_bytes())
        release_dir = pod.home(APP_UID)  # the app (uid 1000) creates the release files
        routes_file = work / "routes.json"
        routes_file.write_text(json.dumps(routes(release_dir), indent=1))
        provider_log = pod.provider.workdir / "requests.jsonl"
        with contextlib.ExitStack() as stack:
            stack.callback(shutil.rmtree, work, ignore_errors=True)  # runs last
            provider, provider_err = _start_provider(pod, provider_argv(
                routes_file, cert=tls.cert, key=tls.key, listen=["0.0.0.0:443", "[::]:443"],
                log=provider_log, python=sys.executable), "provider")
            stack.callback(_stop, provider)
            plain_log = None
            if plain_routes is not None:
                plain_file = work / "plain-routes.json"
                plain_file.write_text(json.dumps(plain_routes, indent=1))
                plain_log = pod.provider.workdir / "plain-requests.jsonl"
                plain, _ = _start_provider(pod, provider_command(
                    plain_file, cert=None, key=None, listen=list(plain_listen),
                    log=plain_log, python=sys.executable), "plain")
                stack.callback(_stop, plain)

            # The namespace's podtally CA, as mounted into the sidecar (key readable by 1337
            # only) and, the certificate alone, into the app as its trust bundle.
            ca_pem, ca_key = generate_ca("podtally e2e namespace CA")
            sidecar_dir = work / "sidecar"
            sidecar_dir.mkdir(mode=0o755)
            ca_cert = write_file(sidecar_dir / "ca.pem", ca_pem)
            ca_key_file = write_file(sidecar_dir / "ca.key", ca_key, mode=0o400, uid=PROXY_UID)
            podtally_ca = write_file(work / "podtally-ca-bundle.pem", ca_pem)
            labels = write_file(sidecar_dir / "labels", LABELS_FILE)

            # Init container: the capture rules, as root in the pod.
            init = pod.run([sys.executable, "-m", "podtally.cli", "init-iptables", *init_args],
                           check=False)
            assert init.returncode == 0, f"init-iptables failed:\n{init.stdout}\n{init.stderr}"

            # The sidecar container, as uid 1337.
            py = python_for_uid(PROXY_UID)
            sidecar_out, sidecar_err = work / "sidecar.stdout", work / "sidecar.stderr"
            sidecar = pod.popen(
                [py.executable, "-m", "podtally.cli", "sidecar",
                 "--ca-cert", str(ca_cert), "--ca-key", str(ca_key_file),
                 "--upstream-ca-bundle", str(provider_ca), "--labels-file", str(labels),
                 "--metrics-port", str(METRICS_PORT), "--drain-timeout", str(DRAIN_TIMEOUT)],
                uid=PROXY_UID, env={**py.env, **POD_ENV},
                stdout=sidecar_out.open("w"), stderr=sidecar_err.open("w"),
            )
            stack.callback(_kill, sidecar)
            env = E2E(pod=pod, dir=work, app_python=python_for_uid(APP_UID),
                      provider_ca=provider_ca, podtally_ca=podtally_ca,
                      provider_log=provider_log, release_dir=release_dir, sidecar=sidecar,
                      sidecar_out=sidecar_out, sidecar_err=sidecar_err,
                      provider_err=provider_err, ca_key_pem=ca_key, app_env=dict(app_env),
                      plain_log=plain_log)
            deadline = time.monotonic() + 30
            while env.get("/readyz")[0] != 200:
                assert sidecar.poll() is None, f"sidecar exited at start{env.diagnostics()}"
                assert time.monotonic() < deadline, (
                    f"sidecar not ready after 30s{env.diagnostics()}")
                time.sleep(0.1)
            yield env


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
