"""A month of LLM calls by several pods, as Prometheus would have scraped them, and as records.

The calls are the ground truth: every number a test expects is summed from them here,
never by podtally's code. From the calls come
- counter samples every SCRAPE seconds for each pod's life (podtally's counters: tokens by
  type, cost, requests), with the pod restarts a month brings: counter resets where the new
  life is exposed at 0 first (podtally's sidecar), and one where the first scrape after the
  restart already holds calls (the zero was missed); short-lived Job pods (a new series a
  day, exposed at 0, gone after a few scrapes); a team-less notebook (`unattributed`);
- the JSON usage records the sidecars printed, one per call, with a few lines that are not
  records mixed in (a log line, a line cut short by a kill).

A call made between two scrapes is in Prometheus from the scrape after it: `scraped_at`.
So a call at 23:58 on the last day is the next month's in Prometheus and this month's in
the records — the reconciliation difference the README explains.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from podtally.usage import Tokens, UsageRecord

SCRAPE = 300  # seconds between scrapes
START = datetime(2024, 1, 1, tzinfo=UTC)
END = datetime(2024, 2, 1, tzinfo=UTC)
DATA_FROM = START - timedelta(hours=2)  # a baseline before the month
DATA_TO = END + timedelta(hours=2)  # and samples after it
TOKEN_TYPES = ("input", "cache_read", "cache_write", "output", "reasoning")

# USD per token by (provider, model, token type): the test's own price table. Costs are
# what the counters hold; the report never prices anything itself.
PRICES = {
    ("openai", "gpt-4o-mini-2024-07-18"): {"input": 0.15e-6, "cache_read": 0.075e-6,
                                           "output": 0.6e-6},
    ("openai", "gpt-4o-2024-08-06"): {"input": 2.5e-6, "cache_read": 1.25e-6, "output": 10e-6},
    ("anthropic", "claude-3-5-sonnet-20240620"): {"input": 3e-6, "cache_read": 0.3e-6,
                                                  "cache_write": 3.75e-6, "output": 15e-6},
    ("openai", "o3-mini-2025-01-31"): {"input": 1.1e-6, "output": 4.4e-6, "reasoning": 4.4e-6},
}


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    workload: str
    team: str
    app: str
    provider: str
    model: str
    born: datetime
    dies: datetime
    calls_per_hour: float
    restarts: tuple[tuple[datetime, bool], ...] = ()  # (when, zero scraped first)
    weekdays_only: bool = False

    @property
    def identity(self) -> dict[str, str]:
        return {"namespace": self.namespace, "workload": self.workload, "team": self.team,
                "app": self.app, "service_account": self.app}


@dataclass(frozen=True)
class Call:
    pod: Pod
    at: datetime  # when the call started (the record's timestamp)
    scraped_at: datetime  # the first scrape that shows it
    tokens: dict[str, int]
    cost_usd: float
    status: str


def _pods() -> list[Pod]:
    d = timedelta(days=1)
    pods = [
        Pod("checkout-7d9f-a", "shop", "checkout", "payments", "checkout", "openai",
            "gpt-4o-mini-2024-07-18", DATA_FROM, DATA_TO, 40,
            restarts=((START + 7 * d + timedelta(hours=12), True),
                      (START + 19 * d + timedelta(hours=3, minutes=7), True))),
        Pod("checkout-7d9f-a", "shop", "checkout", "payments", "checkout", "openai",
            "gpt-4o-2024-08-06", DATA_FROM, DATA_TO, 6,
            restarts=((START + 7 * d + timedelta(hours=12), True),
                      (START + 19 * d + timedelta(hours=3, minutes=7), True))),
        Pod("summarizer-5c9d-x", "ml", "summarizer", "research", "summarizer", "anthropic",
            "claude-3-5-sonnet-20240620", DATA_FROM, DATA_TO, 12,
            restarts=((START + 14 * d + timedelta(hours=9, minutes=2), False),)),
        Pod("chat-66b-q", "web", "chat", "growth", "chat", "openai", "o3-mini-2025-01-31",
            START + 3 * d, DATA_TO, 20, weekdays_only=True),
        Pod("notebook-0", "legacy", "notebook", "unattributed", "notebook", "openai",
            "gpt-4o-2024-08-06", DATA_FROM, START + 25 * d, 3),
    ]
    for day in range(31):  # a nightly Job: a new pod each night, a burst of calls, gone
        born = START + day * d + timedelta(hours=1, minutes=2)
        pods.append(Pod(f"invoice-batch-{day:02d}", "shop", "invoice-batch", "payments",
                        "invoice-batch", "anthropic", "claude-3-5-sonnet-20240620", born,
                        born + timedelta(minutes=20), 30))
    return pods


def _tokens(rng: random.Random, provider: str, model: str) -> dict[str, int]:
    t = dict.fromkeys(TOKEN_TYPES, 0)
    t["input"] = rng.randint(20, 3000)
    t["output"] = rng.randint(5, 900)
    if rng.random() < 0.3 and "cache_read" in PRICES[(provider, model)]:
        t["cache_read"] = rng.randint(500, 5000)
    if rng.random() < 0.1 and "cache_write" in PRICES[(provider, model)]:
        t["cache_write"] = rng.randint(500, 3000)
    if "reasoning" in PRICES[(provider, model)]:
        t["reasoning"] = rng.randint(0, 2000)
    return t


def _next_scrape(t: datetime) -> datetime:
    since = (t - DATA_FROM).total_seconds()
    k = int(since // SCRAPE) + 1
    return DATA_FROM + timedelta(seconds=k * SCRAPE)


def make_calls(seed: int = 6) -> list[Call]:
    rng = random.Random(seed)
    calls: list[Call] = []
    for pod in _pods():
        t = pod.born + timedelta(seconds=SCRAPE + 1)  # after the zero-first scrape
        while True:
            t += timedelta(seconds=rng.expovariate(pod.calls_per_hour / 3600))
            if t >= pod.dies - timedelta(seconds=SCRAPE):
                break  # the last scrape before the pod is gone shows every call
            if pod.weekdays_only and t.weekday() >= 5:
                continue
            # podtally's sidecar drains on SIGTERM until a last scrape: no call is lost to a
            # restart, so no call falls in the gap just before one.
            if any(timedelta(0) <= when - t < timedelta(seconds=SCRAPE)
                   for when, _ in pod.restarts):
                continue
            status = "200" if rng.random() > 0.02 else "429"
            tokens = _tokens(rng, pod.provider, pod.model) if status == "200" \
                else dict.fromkeys(TOKEN_TYPES, 0)
            price = PRICES[(pod.provider, pod.model)]
            cost = sum(n * price.get(k, 0.0) for k, n in tokens.items())
            calls.append(Call(pod, t, _next_scrape(t), tokens, cost, status))
    return calls


def series(calls: list[Call]) -> dict[tuple[str, tuple[tuple[str, str], ...]],
                                      list[tuple[float, float]]]:
    """Counter samples at every scrape of every pod's life, as podtally exposes them."""
    by_pod: dict[tuple[str, str], list[Call]] = defaultdict(list)
    for c in calls:
        by_pod[(c.pod.name, c.pod.model)].append(c)
    out: dict[tuple[str, tuple[tuple[str, str], ...]], list[tuple[float, float]]] = {}
    for pod in _pods():
        mine = sorted(by_pod.get((pod.name, pod.model), []), key=lambda c: c.at)
        base = {**pod.identity, "provider": pod.provider, "model": pod.model,
                "pod": pod.name, "instance": f"{pod.name}:15090", "job": "podtally"}

        def key(metric: str, **extra: str) -> tuple[str, tuple[tuple[str, str], ...]]:
            return metric, tuple(sorted({**base, **extra}.items()))  # noqa: B023

        keys = {("tok", t): key("podtally_llm_tokens_total", token_type=t)
                for t in TOKEN_TYPES if t in PRICES[(pod.provider, pod.model)]}
        keys[("cost", "")] = key("podtally_llm_cost_usd_total")
        for code in ("200", "429"):
            keys[("req", code)] = key("podtally_llm_requests_total", operation="chat", code=code)
        values = dict.fromkeys(keys, 0.0)
        i = 0
        t = pod.born
        # Scrapes on the global grid from the pod's birth on.
        t = _next_scrape(t - timedelta(microseconds=1)) if t > DATA_FROM else DATA_FROM
        restarts = list(pod.restarts)
        while t <= pod.dies and t <= DATA_TO:
            zero_now = False
            if restarts and t > restarts[0][0]:
                _, zero_first = restarts.pop(0)
                values = dict.fromkeys(keys, 0.0)  # a new life counts from 0
                zero_now = zero_first
            if not zero_now:
                while i < len(mine) and mine[i].scraped_at <= t:
                    c = mine[i]
                    for tt, n in c.tokens.items():
                        if ("tok", tt) in values:
                            values[("tok", tt)] += n
                    values[("cost", "")] += c.cost_usd
                    values[("req", c.status)] += 1
                    i += 1
            for k, metric_key in keys.items():
                out.setdefault(metric_key, []).append((t.timestamp(), values[k]))
            t += timedelta(seconds=SCRAPE)
        assert i == len(mine), (pod.name, i, len(mine))  # every call scraped
    return out


@dataclass
class Totals:
    tokens: dict[str, int]
    cost_usd: float
    requests: int

    @property
    def tokens_total(self) -> int:
        return sum(self.tokens.values())


def totals(calls: list[Call], key: tuple[str, ...], *, start: datetime = START,
           end: datetime = END, by_scrape: bool = True) -> dict[tuple[str, ...], Totals]:
    """Sum the calls counted in [start, end) by the given identity/provider/model labels:
    at their scrape (Prometheus) or at their start (records)."""
    out: dict[tuple[str, ...], Totals] = {}
    for c in calls:
        when = c.scraped_at if by_scrape else c.at
        if not start <= when < end:
            continue
        labels = {**c.pod.identity, "provider": c.pod.provider, "model": c.pod.model}
        k = tuple(labels[x] for x in key)
        tot = out.setdefault(k, Totals(dict.fromkeys(TOKEN_TYPES, 0), 0.0, 0))
        for t, n in c.tokens.items():
            tot.tokens[t] += n
        tot.cost_usd += c.cost_usd
        tot.requests += 1
    return out


def daily_cost(calls: list[Call], label: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(lambda: [0.0] * 31)
    for c in calls:
        if START <= c.scraped_at < END:
            labels = {**c.pod.identity, "provider": c.pod.provider, "model": c.pod.model}
            out[labels[label]][(c.scraped_at - START).days] += c.cost_usd
    return dict(out)


def record_lines(calls: list[Call]) -> Iterator[str]:
    """The sidecars' stdout: a JSON record per call, and some lines that are not records."""
    for n, c in enumerate(sorted(calls, key=lambda c: c.at)):
        rec = UsageRecord(
            timestamp=c.at.isoformat(), pod=c.pod.name, provider=c.pod.provider,
            host=f"api.{c.pod.provider}.com", operation="chat", model=c.pod.model,
            request_model=c.pod.model, streamed=False, status=c.status, service_tier=None,
            tokens=Tokens(**c.tokens) if c.status == "200" else None,
            tokens_total=sum(c.tokens.values()), tokens_estimated=False, cost_usd=c.cost_usd,
            priced=True, price_tier="standard", duration_seconds=0.5,
            time_to_first_token_seconds=None, request_id=None, response_id=None,
            usage_injected=False, error=None, **c.pod.identity)
        line = rec.model_dump_json()
        if n == 100:
            yield "podtally: sidecar listening on :15001 (transparent)"
        if n == 2000:
            yield line[: len(line) // 2]  # a duplicate cut short by a kill: not a record
        if n == 3000:
            yield json.dumps({"level": "info", "msg": "metrics scraped"})
        yield line


# -- the eBPF agent's view: LLM connections, metered by a sidecar or not ----------------------

AGENT_FROM = START + timedelta(days=1)  # the agent was rolled out on January 2nd
# node-a's agent restarted: its series come back holding the connections made since (the
# first scrape after the restart missed their zero), a counter reset without a zero.
AGENT_RESTART = START + timedelta(days=19, hours=13, minutes=1)
AGENT_NS = "podtally-system"


@dataclass(frozen=True)
class Egress:
    """A workload's connections to one provider, as the agent on its node counts them."""

    namespace: str
    workload: str
    team: str
    app: str
    provider: str
    node: str
    sidecar_per_hour: float  # through the pod's sidecar (each with the sidecar's own leg)
    direct_per_hour: float  # unmetered: no sidecar, or a destination the rules skip
    until: datetime = DATA_TO

    @property
    def identity(self) -> dict[str, str]:
        return {"namespace": self.namespace, "workload": self.workload, "team": self.team,
                "app": self.app, "service_account": self.app}


EGRESS = (
    Egress("shop", "checkout", "payments", "checkout", "openai", "a", 4, 0),
    # A bypass: checkout reaches Anthropic through an address its rules exclude.
    Egress("shop", "checkout", "payments", "checkout", "anthropic", "a", 0, 0.5),
    Egress("shop", "invoice-batch", "payments", "invoice-batch", "anthropic", "a", 0.25, 0),
    Egress("legacy", "notebook", "unattributed", "notebook", "openai", "a", 0, 1,
           START + timedelta(days=25)),
    Egress("ml", "summarizer", "research", "summarizer", "anthropic", "b", 3, 0),
    Egress("web", "chat", "growth", "chat", "openai", "b", 2, 0),
    # No sidecar and no OpenSSL (a Go program): the agent counts it, nothing meters its calls.
    Egress("data", "scraper", "growth", "scraper", "openai", "b", 0, 2),
)


@dataclass(frozen=True)
class Connection:
    who: Egress
    via: str  # sidecar | proxy | direct
    at: datetime
    scraped_at: datetime


def make_connections(seed: int = 7) -> list[Connection]:
    rng = random.Random(seed)
    out: list[Connection] = []
    for who in EGRESS:
        for via, rate in (("sidecar", who.sidecar_per_hour), ("direct", who.direct_per_hour)):
            if not rate:
                continue
            t = AGENT_FROM + timedelta(seconds=SCRAPE + 1)
            while True:
                t += timedelta(seconds=rng.expovariate(rate / 3600))
                if t >= who.until - timedelta(seconds=SCRAPE):
                    break
                if who.node == "a" and timedelta(0) <= AGENT_RESTART - t < timedelta(
                        seconds=SCRAPE):
                    continue  # the agent drains on SIGTERM: nothing falls in the gap
                out.append(Connection(who, via, t, _next_scrape(t)))
                if via == "sidecar":  # the sidecar's upstream leg of the same call
                    out.append(Connection(who, "proxy", t, _next_scrape(t)))
    return out


def agent_series(conns: list[Connection]) -> dict[tuple[str, tuple[tuple[str, str], ...]],
                                                  list[tuple[float, float]]]:
    """The agents' counters as Prometheus scraped them from the agent pods without
    honor_labels: the metric's namespace renamed `exported_namespace`, the agent pod's in
    `namespace`. Each series appears at 0 before its first connection; node-a's restart
    brings its series back already counting."""
    by_series: dict[tuple[str, tuple[tuple[str, str], ...]], list[Connection]] = \
        defaultdict(list)
    for c in conns:
        ident = c.who.identity
        labels = {**{k: v for k, v in ident.items() if k != "namespace"},
                  "exported_namespace": ident["namespace"], "namespace": AGENT_NS,
                  "pod": f"podtally-ebpf-agent-{c.who.node}",
                  "instance": f"node-{c.who.node}:15091", "job": "podtally-ebpf-agent",
                  "provider": c.who.provider}
        by_series[("podtally_llm_connections_total",
                   tuple(sorted({**labels, "via": c.via}.items())))].append(c)
        if c.via == "direct":
            by_series[("podtally_llm_unmetered_connections_total",
                       tuple(sorted(labels.items())))].append(c)
    out: dict[tuple[str, tuple[tuple[str, str], ...]], list[tuple[float, float]]] = {}
    step = timedelta(seconds=SCRAPE)
    for key, mine in by_series.items():
        restarts = mine[0].who.node == "a"
        lives = [[c for c in mine if not restarts or c.at < AGENT_RESTART],
                 [c for c in mine if restarts and c.at >= AGENT_RESTART]]
        samples: list[tuple[float, float]] = []
        for n, life in enumerate(lives):
            if not life:
                continue
            # Born: exposed at 0 first. Back after the restart: already counting.
            t = life[0].scraped_at - step if not samples else life[0].scraped_at
            reset_from = samples[-1][1] if samples else None
            life_end = AGENT_RESTART if restarts and n == 0 else DATA_TO + step
            seen = 0
            while t < life_end and t <= DATA_TO:
                while seen < len(life) and life[seen].scraped_at <= t:
                    seen += 1
                value = float(seen)
                if reset_from is not None:
                    assert value < reset_from, key  # a drop: Prometheus sees the reset
                    reset_from = None
                samples.append((t.timestamp(), value))
                t += step
        out[key] = samples
    return out


def connection_totals(conns: list[Connection], key: tuple[str, ...], *, start: datetime = START,
                      end: datetime = END) -> dict[tuple[str, ...], dict[str, int]]:
    """Connections counted in [start, end) (at their scrape) by identity/provider labels,
    per `via`."""
    out: dict[tuple[str, ...], dict[str, int]] = {}
    for c in conns:
        if start <= c.scraped_at < end:
            labels = {**c.who.identity, "provider": c.who.provider}
            by_via = out.setdefault(tuple(labels[x] for x in key),
                                    {"sidecar": 0, "proxy": 0, "direct": 0})
            by_via[c.via] += 1
    return out
