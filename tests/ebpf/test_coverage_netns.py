"""Coverage for real: pods played by network namespaces, their processes in cgroups named
the way kubelet names them, pod metadata from an API server (kmock's emulator), and the
agent counting TCP connections to the LLM endpoint by how they are metered.

- `ml/summarizer` has no sidecar: its three connections to the provider are unmetered,
  and its SDK call is metered by the agent itself from OpenSSL's plaintext.
- `shop/checkout` has a sidecar (`podtally-init` captures 443 and 80): the app's call goes
  through it (one `via="sidecar"` connection, one `via="proxy"` upstream leg of the sidecar,
  uid 1337), nothing is unmetered but the app's one connection to port 8443, which its
  capture rules do not redirect (a bypass). The agent copies no plaintext of this pod.
"""

from __future__ import annotations

import json
import secrets
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.e2e_pod import APP_UID, PROXY_UID, metered_pod, write_file
from support.ebpf_agent import TestCgroup, libssl_of_python, running_agent
from support.fake_provider import make_provider_tls, provider_command, wait_ready
from support.kube_emulator import RunningEmulator
from support.netns import PROVIDER_ADDR, pod_with_provider, python_for_uid
from support.sidecar import select, total

pytestmark = [pytest.mark.ebpf, pytest.mark.netns]

DATA = Path(__file__).parents[1] / "providers" / "testdata"
NODE = "node-1"
CHAT = json.loads((DATA / "openai-chat.response.json").read_text())
CHAT_TOKENS = json.loads((DATA / "openai-chat.expected.json").read_text())["tokens"]

SUMMARIZER = {"namespace": "ml", "workload": "summarizer", "team": "research",
              "app": "summarizer", "service_account": "summarizer"}
CHECKOUT = {"namespace": "shop", "workload": "checkout", "team": "payments",
            "app": "checkout", "service_account": "checkout-sa"}

APP_DIRECT = r'''
import json, socket, openai
client = openai.OpenAI(api_key="sk-test-SECRET", max_retries=0)
r = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
client.close()
for _ in range(2):
    socket.create_connection(("api.openai.com", 443), timeout=5).close()
socket.create_connection(("198.19.0.1", 443), timeout=5).close()  # not an LLM endpoint
print(json.dumps({"model": r.model}))
'''

APP_BEHIND_SIDECAR = r'''
import json, socket, openai
client = openai.OpenAI(api_key="sk-test-SECRET", max_retries=0)
r = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
client.close()
try:  # a port the pod's rules do not redirect: straight to the provider, unmetered
    socket.create_connection(("api.openai.com", 8443), timeout=5).close()
except ConnectionRefusedError:
    pass
print(json.dumps({"model": r.model}))
'''


def pod_object(namespace: str, name: str, rs: str, template_hash: str, labels: dict[str, str],
               sa: str, uid: str, container_ids: dict[str, str], *,
               sidecar: bool) -> dict[str, Any]:
    containers = [{"name": "app", "image": "python:3.11-slim"}]
    init: list[dict[str, Any]] = []
    if sidecar:
        init = [{"name": "podtally-init", "image": "podtally", "command": ["podtally", "init-iptables"],
                 "args": ["--proxy-uid=1337", "--proxy-port=15001", "--ports=443,80",
                          "--exclude-cidrs="]},
                {"name": "podtally-sidecar", "image": "podtally", "restartPolicy": "Always"}]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid,
                     "labels": {**labels, "pod-template-hash": template_hash},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                          "name": rs, "uid": str(uuid.uuid4()),
                                          "controller": True}]},
        "spec": {"nodeName": NODE, "serviceAccountName": sa, "containers": containers,
                 "initContainers": init},
        "status": {"containerStatuses": [
            {"name": n, "containerID": f"containerd://{cid}"} for n, cid in container_ids.items()]},
    }


def container_cgroup(cg: TestCgroup, pod_uid: str, container_id: str) -> Path:
    """systemd-driver kubelet layout: kubepods.slice/…/kubepods-besteffort-pod<uid>.slice/
    cri-containerd-<id>.scope."""
    pod = f"kubepods-besteffort-pod{pod_uid.replace('-', '_')}.slice"
    return cg.child(f"kubepods.slice/kubepods-besteffort.slice/{pod}/"
                    f"cri-containerd-{container_id}.scope")


@pytest.fixture
def emulator() -> Iterator[RunningEmulator]:
    with RunningEmulator() as emu:
        emu.namespace("ml")
        emu.namespace("shop", {"team": "payments"})  # the team label comes from here
        yield emu


def test_unmetered_and_sidecar_metered_connections(
        cgroup: TestCgroup, emulator: RunningEmulator, tmp_path: Path) -> None:
    ids = {k: secrets.token_hex(32) for k in ("ml-app", "shop-app", "shop-sidecar")}
    ml_uid, shop_uid = str(uuid.uuid4()), str(uuid.uuid4())
    emulator.create(pod_object(
        "ml", "summarizer-5c9d7-x2x4z", "summarizer-5c9d7", "5c9d7",
        {"app": "summarizer", "team": "research"}, "summarizer", ml_uid,
        {"app": ids["ml-app"]}, sidecar=False))
    emulator.create(pod_object(
        "shop", "checkout-7d9f8b6c5-x2x4z", "checkout-7d9f8b6c5", "7d9f8b6c5",
        {"app.kubernetes.io/name": "checkout"}, "checkout-sa", shop_uid,
        {"app": ids["shop-app"], "podtally-sidecar": ids["shop-sidecar"]}, sidecar=True))

    with running_agent("--api-server", emulator.url, "--node-name", NODE,
                       "--llm-endpoint", f"{PROVIDER_ADDR}=openai",
                       cgroup=cgroup.root, libssl=[libssl_of_python()]) as agent:
        # ml/summarizer: no sidecar.
        with pod_with_provider(["api.openai.com"]) as pod:
            pod.provider.add_address("198.19.0.1")
            tls = make_provider_tls(pod.provider.workdir / "tls", hosts=["api.openai.com"],
                                    ip_addresses=[PROVIDER_ADDR])
            routes = pod.provider.workdir / "routes.json"
            routes.write_text(json.dumps({"routes": [
                {"method": "POST", "path": "/v1/chat/completions", "json": CHAT}]}))
            ready = pod.provider.workdir / "ready.json"
            server = pod.provider.popen([*provider_command(
                routes, cert=tls.cert, key=tls.key, listen=["0.0.0.0:443"],
                python=sys.executable), "--ready-file", str(ready)])
            wait_ready(ready, server)
            ca = write_file(pod.workdir / "provider-ca.pem", tls.ca_cert.read_bytes())
            py = python_for_uid(APP_UID)
            script = write_file(pod.workdir / "app.py", APP_DIRECT)
            app = pod.popen([py.executable, str(script)], uid=APP_UID,
                            env={**py.env, "SSL_CERT_FILE": str(ca)},
                            preexec_fn=cgroup.joiner(container_cgroup(cgroup, ml_uid, ids["ml-app"])))
            out, err = app.communicate(timeout=60)
            assert app.returncode == 0, err
            assert json.loads(out)["model"] == "gpt-4o-2024-08-06"

        (rec,) = agent.wait_records(1)
        assert {k: rec[k] for k in SUMMARIZER} == SUMMARIZER
        assert rec["pod"] == "summarizer-5c9d7-x2x4z"
        assert rec["host"] == "api.openai.com" and rec["tokens"] == CHAT_TOKENS

        # shop/checkout: behind its sidecar.
        with metered_pod(hosts={"api.openai.com": PROVIDER_ADDR}, tls_hosts=["api.openai.com"],
                         routes=lambda _: {"routes": [
                             {"method": "POST", "path": "/v1/chat/completions",
                              "json": CHAT}]}) as e2e:
            TestCgroup.move(e2e.sidecar.pid,
                            container_cgroup(cgroup, shop_uid, ids["shop-sidecar"]))
            script = write_file(e2e.dir / "app-behind.py", APP_BEHIND_SIDECAR)
            app = e2e.pod.popen(
                [e2e.app_python.executable, str(script)], uid=APP_UID,
                env={**e2e.app_python.env, "SSL_CERT_FILE": str(e2e.podtally_ca)},
                preexec_fn=cgroup.joiner(container_cgroup(cgroup, shop_uid, ids["shop-app"])))
            out, err = app.communicate(timeout=60)
            assert app.returncode == 0, err
            assert json.loads(out)["model"] == "gpt-4o-2024-08-06"
            assert len(e2e.wait_records(1)) == 1  # the sidecar metered it

            m = agent.wait_metric(lambda m: total(
                m, "podtally_llm_connections_total", namespace="shop") >= 3)

    conns = "podtally_llm_connections_total"
    assert total(m, conns, via="direct", provider="openai", **SUMMARIZER) == 3
    assert total(m, "podtally_llm_unmetered_connections_total", provider="openai",
                 **SUMMARIZER) == 3
    assert total(m, conns, via="sidecar", provider="openai", **CHECKOUT) == 1
    assert total(m, conns, via="proxy", provider="openai", **CHECKOUT) == 1
    assert total(m, conns, via="direct", provider="openai", **CHECKOUT) == 1
    assert total(m, "podtally_llm_unmetered_connections_total", **CHECKOUT) == 1
    assert total(m, conns) == 6  # nothing else: 198.19.0.1 is no LLM endpoint
    # The sidecar meters shop/checkout: the agent recorded only the summarizer's call.
    assert len(agent.records) == 1
    assert select(m, "podtally_llm_requests_total", namespace="shop") == {}
    assert PROXY_UID == 1337
