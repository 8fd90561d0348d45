"""`podtally operator` as the chart runs it: a process against an API server (kmock's
emulator), serving the webhook with the certificate it made, reconciling as the leader."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from support.kube_emulator import RunningEmulator

from podtally.cli import main

from .test_controller import webhook_configuration
from .test_webhook import review_request

OPNS = "podtally-system"
FLAGS = ["--namespace", "--webhook-port", "--metrics-port", "--webhook-service",
         "--webhook-config", "--cert-dir", "--cert-manager", "--injection-config",
         "--injection-template", "--leader-election", "--no-leader-election", "--lease-name",
         "--ca-validity-days", "--ca-rotate-before-days", "--resync-seconds", "--kubeconfig"]


def test_operator_flags() -> None:
    result = CliRunner().invoke(main, ["operator", "--help"])
    assert result.exit_code == 0, result.output
    for flag in FLAGS:
        assert flag in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ca-validity-days", "30", "--ca-rotate-before-days", "30"], "must exceed"),
        (["--injection-config", "{config}"], "proxy_portt"),
        (["--injection-template", "{template}"], "injection template"),
    ],
)
def test_operator_rejects_bad_settings_before_starting(
    tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "config.yaml").write_text("proxy_portt: 1\n")
    (tmp_path / "template.yaml").write_text("sidecar: {{ no_such_value }}\n")
    args = [a.format(config=tmp_path / "config.yaml", template=tmp_path / "template.yaml")
            for a in args]
    result = CliRunner().invoke(main, ["operator", *args])
    assert result.exit_code != 0 and message in result.output, result.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {check}")


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""


def test_operator_process_end_to_end(tmp_path: Path, emulator: RunningEmulator) -> None:
    emulator.namespace(OPNS)
    emulator.namespace("shop", {"podtally.io/inject": "enabled"})
    emulator.create(webhook_configuration("inject.podtally.io"))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": emulator.url}}],
        "users": [{"name": "test", "user": {"token": "test"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test"}}],
    }))
    webhook_port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "podtally.cli", "operator", "--kubeconfig", str(kubeconfig),
         "--namespace", OPNS, "--webhook-port", str(webhook_port),
         "--metrics-port", str(metrics_port), "--cert-dir", str(tmp_path / "certs"),
         "--resync-seconds", "1"],
        env={**env, "POD_NAME": "podtally-operator-0"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: http_get(metrics_port, "/readyz")[0] == 200)
        lease = emulator.stored("coordination.k8s.io/v1/leases", OPNS, "podtally-operator")
        assert lease is not None
        assert lease["spec"]["holderIdentity"].startswith("podtally-operator-0_")
        wait_for(lambda: emulator.stored("v1/secrets", "shop", "podtally-ca"))
        config = wait_for(lambda: (emulator.stored(
            "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations", None, "podtally")
            or {"webhooks": [{"clientConfig": {}}]})["webhooks"][0]["clientConfig"].get("caBundle"))

        # As the API server calls it: the Service's name, verified against caBundle.
        name = f"podtally-webhook.{OPNS}.svc"
        ctx = ssl.create_default_context(cadata=base64.b64decode(config).decode())
        conn = http.client.HTTPSConnection(name, webhook_port, timeout=10)
        conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", webhook_port)),
                                    server_hostname=name)
        conn.request("POST", "/inject", body=json.dumps(review_request()).encode(),
                     headers={"Content-Type": "application/json"})
        resp = json.loads(conn.getresponse().read())["response"]
        conn.close()
        assert resp["allowed"] is True and resp["patchType"] == "JSONPatch"

        emulator.namespace("late", {"podtally.io/inject": "enabled"})
        wait_for(lambda: emulator.stored("v1/configmaps", "late", "podtally-trust-bundle"))
        metrics = wait_for(lambda: (lambda t: t if "namespace_cas 2.0" in t else None)(
            http_get(metrics_port, "/metrics")[1]))
        assert 'podtally_operator_injections_total{reason="namespace",result="injected"} 1.0' \
            in metrics
        assert "podtally_operator_leader 1.0" in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    lease = emulator.stored("coordination.k8s.io/v1/leases", OPNS, "podtally-operator")
    assert lease is not None and "holderIdentity" not in lease["spec"], out  # released
