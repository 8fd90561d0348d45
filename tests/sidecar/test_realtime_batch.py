"""The sidecar as a real process (explicit-proxy mode) in front of:

- a real TLS WebSocket fake of OpenAI Realtime replaying a recorded session, driven by the
  official SDK's realtime client (`client.realtime.connect`, through the proxy with the
  `websockets` library's own `proxy=` support): one record per `response.done` with exact
  tokens, every server frame byte-identical and in order, and a sidecar whose memory does
  not grow with the audio it relays;
- the HTTPS fake provider serving OpenAI Batch files, downloaded with
  `client.files.content(...)`: one record per result line, at batch prices; files that
  are not batch results give none.

`localhost` is an LLM host by configuration (`--llm-host localhost=openai`), as in
test_sidecar_process.py.
"""

from __future__ import annotations

import base64
import json
import random
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from support.fake_provider import FakeProvider, Script, make_provider_tls
from support.fake_ws import FakeRealtimeServer, Reply
from support.sidecar import SidecarProcess, base_env, free_port, sidecar_argv, total

from podtally.certs import generate_ca
from podtally.pricing import PriceBook

DATA = Path(__file__).parent.parent / "providers" / "testdata"
SECRET = "sk-test-SECRET-4242"
IDENTITY = {
    "POD_NAMESPACE": "voice",
    "POD_NAME": "agent-5c6d-xyz12",
    "POD_SERVICE_ACCOUNT": "agent-sa",
    "PODTALLY_WORKLOAD": "agent",
}
URL_MODEL = "gpt-4o-realtime-preview"

FRAMES = (DATA / "openai-realtime-session.events.jsonl").read_bytes().splitlines()
RT_EXPECTED = json.loads((DATA / "openai-realtime-session.expected-calls.json").read_text())


def _types() -> list[str]:
    return [json.loads(f)["type"] for f in FRAMES]


def realtime_script() -> list[Reply]:
    """The recorded session, cut where the client's own events came in: session.created on
    connect; session.updated after session.update; the user item after
    conversation.item.create; the first response after response.create; the second turn
    (server VAD on the user's audio) after the client's audio is committed."""
    t = _types()
    upd, item, resp1 = t.index("session.updated"), 2, t.index("response.created")
    turn2 = t.index("input_audio_buffer.speech_started")
    assert (upd, item, resp1) == (1, 2, 3)
    return [
        Reply(None, FRAMES[:upd]),
        Reply("session.update", FRAMES[upd:item]),
        Reply("conversation.item.create", FRAMES[item:resp1]),
        Reply("response.create", FRAMES[resp1:turn2]),
        Reply("input_audio_buffer.commit", FRAMES[turn2:]),
    ]


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        ca, key = generate_ca("podtally test namespace CA")
        self.ca = tmp / "ca.pem"
        self.ca.write_bytes(ca)
        self.ca_key = tmp / "ca.key"
        self.ca_key.write_bytes(key)
        self.labels = tmp / "labels"
        self.labels.write_text('app.kubernetes.io/name="agent"\nteam="voice-team"\n')
        self.tls = make_provider_tls(tmp / "provider")
        self.provider = FakeProvider({}, cert=self.tls.cert, key=self.tls.key).start()
        self.realtime = FakeRealtimeServer(cert=self.tls.cert, key=self.tls.key).start()

    def start_sidecar(self, *extra: str) -> SidecarProcess:
        port, metrics_port = free_port(), free_port()
        argv = sidecar_argv(
            "--ca-cert", str(self.ca), "--ca-key", str(self.ca_key), "--mode", "regular",
            "--listen-host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(metrics_port), "--labels-file", str(self.labels),
            "--upstream-ca-bundle", str(self.tls.ca_cert),
            "--llm-host", "localhost=openai", *extra,
        )
        sc = SidecarProcess(argv, env=base_env(**IDENTITY),
                            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics")
        sc.proxy_port = port
        sc.wait_ready()
        return sc

    def client_tls(self) -> ssl.SSLContext:
        """What the app trusts: the namespace CA the sidecar signs with."""
        return ssl.create_default_context(cafile=str(self.ca))

    def openai_client(self, sc: SidecarProcess, *, port: int | None = None) -> openai.OpenAI:
        import httpx

        return openai.OpenAI(
            base_url=f"https://localhost:{port or self.provider.port}/v1", api_key=SECRET,
            http_client=httpx.Client(proxy=f"http://127.0.0.1:{sc.proxy_port}",
                                     verify=self.client_tls(), timeout=15),
        )

    def ws_options(self, sc: SidecarProcess, **kw: Any) -> dict[str, Any]:
        # httpx's proxy does not apply to WebSockets: the `websockets` library tunnels
        # through the proxy with an HTTP CONNECT of its own.
        # open_timeout: the handshake crosses the proxy and a TLS interception; 10 s (the
        # default) was seen to run out on a machine loaded by parallel test runs.
        return {"proxy": f"http://127.0.0.1:{sc.proxy_port}", "ssl": self.client_tls(),
                "open_timeout": 30, **kw}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("realtime-batch"))
    try:
        yield e
    finally:
        e.provider.stop()
        e.realtime.stop()


@pytest.fixture(scope="module")
def sidecar(env: Env) -> Iterator[SidecarProcess]:
    sc = env.start_sidecar()
    yield sc
    exposition = sc.metrics()
    assert sc.terminate() == 0
    everything = "".join(sc.stdout_lines) + sc.stderr + repr(exposition)
    assert SECRET not in everything
    assert "metering fault" not in sc.stderr, sc.stderr


def new_records(sc: SidecarProcess, before: int, n: int) -> list[dict[str, Any]]:
    got = sc.wait_records(before + n)[before:]
    time.sleep(0.3)  # nothing more may follow
    assert len(sc.records) == before + n, sc.records[before + n:]
    return got


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- OpenAI Realtime over WebSocket --------------------------------------------------------


def test_realtime_session_through_the_sdk(env: Env, sidecar: SidecarProcess) -> None:
    env.realtime.script = realtime_script()
    n_conn = len(env.realtime.connections)
    before = len(sidecar.records)
    client = env.openai_client(sidecar, port=env.realtime.port)
    received: list[bytes] = []
    with client.realtime.connect(model=URL_MODEL,
                                 websocket_connection_options=env.ws_options(sidecar)) as conn:
        received.append(conn.recv_bytes())  # session.created
        conn.session.update(session={"type": "realtime", "instructions": "Be brief."})
        received.append(conn.recv_bytes())  # session.updated
        conn.conversation.item.create(item={
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello!"}]})
        received.append(conn.recv_bytes())  # conversation.item.created
        conn.response.create()
        while json.loads(received[-1])["type"] != "response.done":
            received.append(conn.recv_bytes())
        # The second turn: the user speaks (100 ms of silent 24 kHz PCM16) and commits.
        conn.input_audio_buffer.append(audio=base64.b64encode(bytes(4800)).decode())
        conn.input_audio_buffer.commit()
        while len(received) < len(FRAMES):
            received.append(conn.recv_bytes())
        # The SDK parses the recorded events too (checked once, on the last response.done).
        assert conn.parse_event(received[-2]).type == "response.done"

    # The client got every server frame, byte-identical and in order.
    assert received == FRAMES

    ws = env.realtime.wait_connection(n_conn + 1)
    assert ws.path == f"/v1/realtime?model={URL_MODEL}"
    assert ws.header("authorization") == f"Bearer {SECRET}"  # the app's key still goes upstream
    assert ws.client_types() == ["session.update", "conversation.item.create", "response.create",
                                 "input_audio_buffer.append", "input_audio_buffer.commit"]
    assert ws.error is None and ws.sent == len(FRAMES)

    recs = new_records(sidecar, before, 2)
    book = PriceBook()
    for rec, exp in zip(recs, RT_EXPECTED["calls"], strict=True):
        assert rec["tokens"] == exp["tokens"]
        assert rec["tokens_total"] == sum(exp["tokens"].values())
        assert (rec["provider"], rec["operation"], rec["status"]) == ("openai", "realtime", "200")
        assert rec["model"] == RT_EXPECTED["model"]  # session.created's snapshot, not the URL alias
        assert rec["response_id"] == exp["response_id"]
        assert rec["streamed"] is True and rec["error"] is None
        assert rec["host"] == "localhost"
        assert (rec["namespace"], rec["workload"], rec["team"], rec["app"]) == (
            "voice", "agent", "voice-team", "agent")
        price = book.price("openai", rec["model"], rec["tokens"])
        assert rec["priced"] is True and rec["cost_usd"] == pytest.approx(price.cost_usd)
        assert rec["price_tier"] == "standard"
        assert 0 <= rec["duration_seconds"] < 10  # from its response.created to its response.done

    m = sidecar.metrics()
    assert total(m, "podtally_llm_requests_total", operation="realtime", model=RT_EXPECTED["model"],
                 code="200", namespace="voice") == 2
    assert total(m, "podtally_llm_tokens_total", model=RT_EXPECTED["model"], token_type="cache_read") == 832 * 2


def _audio_frames(n: int, size: int = 32 * 1024) -> Iterator[bytes]:
    """Synthetic response.audio.delta frames of `size` bytes (the recorded session ran over
    WebRTC, so it has none); the envelope is that of the recorded transcript deltas."""
    template = json.loads(FRAMES[_types().index("response.audio_transcript.delta")])
    template["type"] = "response.audio.delta"
    template["delta"] = ""
    overhead = len(json.dumps(template, separators=(",", ":")))
    raw_len = (size - overhead) // 4 * 3
    for i in range(n):
        template["event_id"] = f"event_audio{i:08d}"
        template["delta"] = base64.b64encode(random.Random(i).randbytes(raw_len)).decode()
        yield json.dumps(template, separators=(",", ":")).encode()


@pytest.mark.parametrize("compression", ["deflate", None], ids=["permessage-deflate", "plain"])
def test_realtime_audio_stream_does_not_grow_the_sidecar(env: Env, sidecar: SidecarProcess,
                                                         compression: str | None) -> None:
    n_audio = 2000
    t = _types()
    created, done = t.index("response.created"), t.index("response.done")
    env.realtime.script = [
        Reply(None, FRAMES[:1]),
        Reply("response.create", [FRAMES[created]]),
        Reply(None, _audio_frames(n_audio)),
        Reply(None, [FRAMES[done]]),
    ]
    n_conn = len(env.realtime.connections)
    before = len(sidecar.records)
    client = env.openai_client(sidecar, port=env.realtime.port)
    opts = env.ws_options(sidecar, compression=compression, max_size=None)
    with client.realtime.connect(model=URL_MODEL, websocket_connection_options=opts) as conn:
        assert conn.recv_bytes() == FRAMES[0]
        time.sleep(0.3)
        rss_before = rss_kib(sidecar.proc.pid)
        conn.response.create()
        assert conn.recv_bytes() == FRAMES[created]
        for i, expected_frame in enumerate(_audio_frames(n_audio)):
            got = conn.recv_bytes()
            assert got == expected_frame, f"audio frame {i} differs"
        assert conn.recv_bytes() == FRAMES[done]
    (rec,) = new_records(sidecar, before, 1)
    rss_after = rss_kib(sidecar.proc.pid)
    ws = env.realtime.wait_connection(n_conn + 1)
    assert ws.sent == n_audio + 3
    assert rec["tokens"] == RT_EXPECTED["calls"][0]["tokens"] and rec["operation"] == "realtime"

    relayed_mib = n_audio * 32 / 1024
    grew_mib = (rss_after - rss_before) / 1024
    # 62.5 MiB went through; a kept message history would hold all of it (and more). Seen:
    # 1-16 MiB of allocator and GC noise, so the bound is half of what was relayed: far
    # above the noise, far below what retaining the frames would cost.
    assert grew_mib < relayed_mib / 2, f"sidecar RSS grew {grew_mib:.1f} MiB relaying {relayed_mib:.1f} MiB"


def test_non_realtime_websocket_on_an_llm_host_is_relayed_unmetered(env: Env, sidecar: SidecarProcess) -> None:
    env.realtime.script = [Reply(None, FRAMES[:1]), Reply("response.create", FRAMES[3:28])]
    before = len(sidecar.records)
    from websockets.sync.client import connect

    with connect(f"wss://localhost:{env.realtime.port}/v1/responses", **env.ws_options(sidecar)) as ws:
        got = [ws.recv(decode=False)]
        ws.send(json.dumps({"type": "response.create"}))
        got += [ws.recv(decode=False) for _ in range(25)]
    assert got == [FRAMES[0], *FRAMES[3:28]]  # response.done included, yet not metered
    time.sleep(0.3)
    assert len(sidecar.records) == before


# -- OpenAI Batch output files ---------------------------------------------------------------


def serve_file(env: Env, file_id: str, body: bytes) -> None:
    env.provider.set_route("GET", f"/v1/files/{file_id}/content", Script(
        headers=[("content-type", "application/octet-stream"), ("x-request-id", f"req_{file_id}")],
        body=body))


@pytest.mark.parametrize("case", ["openai-batch-output", "openai-batch-output-mini"])
def test_batch_output_download_through_the_sdk(env: Env, sidecar: SidecarProcess, case: str) -> None:
    body = (DATA / f"{case}.jsonl").read_bytes()
    exp = json.loads((DATA / f"{case}.expected-calls.json").read_text())
    serve_file(env, "file-abc", body)
    before = len(sidecar.records)
    content = env.openai_client(sidecar).files.content("file-abc")
    assert content.content == body  # the downloaded bytes, unaltered
    assert env.provider.requests[-1].path == "/v1/files/file-abc/content"

    recs = new_records(sidecar, before, len(exp["calls"]))
    book = PriceBook()
    for rec, call in zip(recs, exp["calls"], strict=True):
        assert rec["tokens"] == call["tokens"]
        assert (rec["provider"], rec["operation"], rec["status"]) == ("openai", call["operation"], call["status"])
        assert rec["model"] == call["model"] and rec["request_model"] is None
        assert rec["service_tier"] == "batch" and rec["price_tier"] == "batch"
        assert rec["request_id"] == call["request_id"] and rec["response_id"] == call["response_id"]
        assert rec["streamed"] is False and rec["error"] is None
        standard = book.price("openai", call["model"], call["tokens"]).cost_usd
        batch = book.price("openai", call["model"], call["tokens"], "batch").cost_usd
        assert rec["priced"] is True
        assert rec["cost_usd"] == pytest.approx(batch) == pytest.approx(standard / 2)
        assert standard > 0


def test_batch_error_file_download(env: Env, sidecar: SidecarProcess) -> None:
    body = (DATA / "openai-batch-error.jsonl").read_bytes()
    serve_file(env, "file-err", body)
    before = len(sidecar.records)
    assert env.openai_client(sidecar).files.content("file-err").content == body
    (rec,) = new_records(sidecar, before, 1)
    assert rec["status"] == "400" and rec["tokens"] is None and rec["cost_usd"] == 0
    assert rec["request_id"] == "0538a1cc8f8f8500bbe07250e6aa2b26"
    assert rec["service_tier"] == "batch" and rec["operation"] == "chat"


@pytest.mark.parametrize(
    "body",
    [
        (DATA / "openai-batch-input.jsonl").read_bytes(),
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n' * 3,
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + bytes(range(256)) * 64,
    ],
    ids=["batch-input-file", "fine-tune-file", "binary-file"],
)
def test_non_batch_file_download_is_not_metered(env: Env, sidecar: SidecarProcess, body: bytes) -> None:
    serve_file(env, "file-other", body)
    before = len(sidecar.records)
    assert env.openai_client(sidecar).files.content("file-other").content == body
    # A batch download right after: its records are the only new ones.
    serve_file(env, "file-abc", (DATA / "openai-batch-output-mini.jsonl").read_bytes())
    env.openai_client(sidecar).files.content("file-abc")
    recs = new_records(sidecar, before, 2)
    assert [r["response_id"] for r in recs] == [
        "chatcmpl-AhjSMl7oZ79yIPHLRYgmgXSixTJr7", "chatcmpl-AhjSNgVB4Oa4Hq0NruTRsBaEbRWUP"]
