"""`make demo`: podtally end to end on one machine, no Kubernetes.

A local HTTPS fake provider answers as api.openai.com and api.anthropic.com would (real
recorded payloads). Two workloads of two teams call it with the official SDKs, each through
its own `podtally sidecar` (explicit-proxy mode; in a pod it is transparent). The apps
change nothing but the proxy and CA variables that the injected pod spec sets for them.
Then the sidecars' metrics are scraped and printed as a showback table.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.fake_provider import FakeProvider, Script, make_provider_tls, split_sse  # noqa: E402
from support.sidecar import SidecarProcess, base_env, free_port, sidecar_argv  # noqa: E402

from podtally.certs import generate_ca  # noqa: E402
from podtally.report.render import render_table  # noqa: E402
from podtally.report.rows import aggregate  # noqa: E402

DATA = ROOT / "tests" / "providers" / "testdata"

APP = textwrap.dedent('''
    import os, anthropic, openai
    oa = openai.OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="sk-demo-not-a-key")
    an = anthropic.Anthropic(base_url=os.environ["ANTHROPIC_BASE_URL"], api_key="sk-ant-demo")
    for _ in range(int(os.environ["CALLS"])):
        oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        for _chunk in oa.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                messages=[{"role": "user", "content": "hi"}]):
            pass
        if os.environ.get("USE_ANTHROPIC"):
            with an.messages.stream(model="claude-sonnet-4-5", max_tokens=64,
                                    messages=[{"role": "user", "content": "hi"}]) as s:
                s.until_done()
    print("app done")
''')

WORKLOADS = [
    # namespace, workload, team label, app label, calls, uses Anthropic
    ("shop", "checkout", "payments", "checkout", 3, False),
    ("ml", "summarizer", "research", "summarizer", 2, True),
]


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="podtally-demo-"))
    tls = make_provider_tls(tmp / "provider", ip_addresses=("127.0.0.1", "127.0.0.2"))
    ca, key = generate_ca("podtally demo namespace CA")
    (tmp / "ca.pem").write_bytes(ca)
    (tmp / "ca.key").write_bytes(key)
    openai_routes = {
        ("POST", "/v1/chat/completions"): lambda ex: (
            Script.sse(split_sse((DATA / "openai-chat-stream-usage.response.sse").read_bytes()))
            if ex.json().get("stream") else
            Script(headers=[("content-type", "application/json")],
                   body=(DATA / "openai-chat.response.json").read_bytes())
        ),
    }
    anthropic_routes = {("POST", "/v1/messages"): Script.sse(
        split_sse((DATA / "anthropic-cache-read-stream.response.sse").read_bytes()))}

    with FakeProvider(openai_routes, cert=tls.cert, key=tls.key) as oa_provider, \
            FakeProvider(anthropic_routes, cert=tls.cert, key=tls.key, listen="127.0.0.2:0") as an_provider:
        sidecars: list[SidecarProcess] = []
        try:
            for ns, workload, team, app, calls, use_anthropic in WORKLOADS:
                labels = tmp / f"{workload}.labels"
                labels.write_text(f'app="{app}"\nteam="{team}"\n')
                port, mport = free_port(), free_port()
                sc = SidecarProcess(
                    sidecar_argv("--ca-cert", str(tmp / "ca.pem"), "--ca-key", str(tmp / "ca.key"),
                                 "--mode", "regular", "--listen-host", "127.0.0.1",
                                 "--port", str(port), "--metrics-port", str(mport),
                                 "--labels-file", str(labels),
                                 "--upstream-ca-bundle", str(tls.ca_cert),
                                 "--llm-host", "localhost=openai",
                                 "--llm-host", "127.0.0.2=anthropic"),
                    env=base_env(POD_NAMESPACE=ns, POD_NAME=f"{workload}-5c9d7-x2x4z",
                                 POD_SERVICE_ACCOUNT=workload, PODTALLY_WORKLOAD=workload),
                    metrics_url=f"http://127.0.0.1:{mport}/metrics",
                )
                sidecars.append(sc)
                sc.wait_ready()
                print(f"[demo] sidecar for {ns}/{workload} (team {team}) on :{port}, metrics :{mport}")
                env = {
                    **os.environ,
                    "HTTPS_PROXY": f"http://127.0.0.1:{port}",
                    "SSL_CERT_FILE": str(tmp / "ca.pem"),
                    "OPENAI_BASE_URL": f"https://localhost:{oa_provider.port}/v1",
                    "ANTHROPIC_BASE_URL": f"https://127.0.0.2:{an_provider.port}",
                    "CALLS": str(calls),
                    "USE_ANTHROPIC": "1" if use_anthropic else "",
                }
                subprocess.run([sys.executable, "-c", APP], env=env, check=True, timeout=120)

            samples = []
            for sc in sidecars:
                for (name, labels), value in sc.metrics().items():
                    samples.append((name, dict(labels), value))
            by = ("team", "namespace", "model")
            print()
            print("Showback (from the sidecars' /metrics):")
            print(render_table(aggregate(samples, by), by))
            print()
            print("One usage record per call, e.g.:")
            print(sidecars[-1].stdout_lines[-1].strip())
        finally:
            for sc in sidecars:
                sc.metrics()
                sc.terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
