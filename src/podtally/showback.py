"""Showback rows from the contract's metrics: pure aggregation and plain-text rendering.

Input is already-fetched samples (a scrape, or Prometheus query results), so the same
code serves the demo, tests and `podtally report`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from podtally.usage import TOKEN_TYPES

Labels = Mapping[str, str]


@dataclass
class Row:
    group: tuple[str, ...]
    tokens: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TOKEN_TYPES, 0.0))
    cost_usd: float = 0.0
    requests: float = 0.0

    @property
    def tokens_total(self) -> float:
        return sum(self.tokens.values())


def aggregate(
    samples: Iterable[tuple[str, Labels, float]], by: Sequence[str]
) -> list[Row]:
    """Sum `podtally_llm_{tokens,cost_usd,requests}_total` samples into rows grouped `by`."""
    rows: dict[tuple[str, ...], Row] = defaultdict(lambda: Row(()))
    for name, labels, value in samples:
        key = tuple(labels.get(k, "") for k in by)
        row = rows[key]
        row.group = key
        if name == "podtally_llm_tokens_total":
            row.tokens[labels["token_type"]] += value
        elif name == "podtally_llm_cost_usd_total":
            row.cost_usd += value
        elif name == "podtally_llm_requests_total":
            row.requests += value
    return sorted(rows.values(), key=lambda r: (-r.cost_usd, r.group))


def total_row(rows: Sequence[Row], width: int) -> Row:
    out = Row(("TOTAL",) * width)
    for r in rows:
        for t, v in r.tokens.items():
            out.tokens[t] += v
        out.cost_usd += r.cost_usd
        out.requests += r.requests
    return out


def render_table(rows: Sequence[Row], by: Sequence[str]) -> str:
    header = [*by, "requests", *(f"tokens_{t}" for t in TOKEN_TYPES), "tokens_total", "cost_usd"]
    body = [
        [*r.group, f"{r.requests:.0f}", *(f"{r.tokens[t]:.0f}" for t in TOKEN_TYPES),
         f"{r.tokens_total:.0f}", f"{r.cost_usd:.6f}"]
        for r in [*rows, total_row(rows, len(by))]
    ]
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(header)]
    numeric = len(by)

    def fmt(cells: Sequence[str]) -> str:
        padded = (
            c.rjust(w) if i >= numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(b) for b in body[:-1]), rule, fmt(body[-1])])
