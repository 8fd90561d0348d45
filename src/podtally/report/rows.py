"""Showback rows: the contract's counters summed into groups (pure).

Input is (metric name, labels, value) triples: a live scrape (the demo) or, for `podtally
report`, each series' exact increase over the period.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal

from podtally.usage import TOKEN_TYPES

Labels = Mapping[str, str]

TOKENS = "podtally_llm_tokens_total"
COST = "podtally_llm_cost_usd_total"
REQUESTS = "podtally_llm_requests_total"
METRICS = (TOKENS, COST, REQUESTS)

ID_LABELS = ("namespace", "workload", "team", "app", "service_account")
# What --by may name: the identity labels, then what was called.
GROUP_LABELS = ("team", "namespace", "app", "workload", "service_account", "model", "provider")
DEFAULT_BY = ("team", "namespace", "model")
TOTAL = "TOTAL"
# Costs are kept to the nano-dollar: row values are rounded there, and TOTAL adds the rounded
# rows, so a sheet that sums the column finds TOTAL exactly.
USD_QUANTUM = Decimal("1e-9")


def own_labels(labels: Labels) -> dict[str, str]:
    """The metric's own labels: where Prometheus renamed one to `exported_<name>` because the
    target carried the same label (scrape without honor_labels), the exported value wins."""
    out = dict(labels)
    for key, value in labels.items():
        if key.startswith("exported_"):
            out[key.removeprefix("exported_")] = value
    return out


def usd(x: float) -> Decimal:
    """USD to the nano-dollar, half up (+ 0 turns -0 into 0)."""
    return Decimal(x).quantize(USD_QUANTUM, rounding=ROUND_HALF_UP) + 0


def usd_text(x: float) -> str:
    """`0.003676500`: fixed-point, never an exponent."""
    return f"{usd(x):f}"


@dataclass
class Row:
    group: tuple[str, ...]
    tokens: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TOKEN_TYPES, 0.0))
    cost_usd: float = 0.0
    requests: float = 0.0

    @property
    def tokens_total(self) -> float:
        return sum(self.tokens.values())

    @property
    def empty(self) -> bool:
        return not (self.cost_usd or self.requests or any(self.tokens.values()))


def aggregate(samples: Iterable[tuple[str, Labels, float]], by: Sequence[str]) -> list[Row]:
    """Sum the contract's counters into rows grouped `by` (most expensive first).

    Token types outside the contract's buckets are ignored; groups where everything is 0 are
    left out.
    """
    rows: dict[tuple[str, ...], Row] = defaultdict(lambda: Row(()))
    for name, raw, value in samples:
        if name not in METRICS:
            continue
        labels = own_labels(raw)
        key = tuple(labels.get(k, "") for k in by)
        row = rows[key]
        row.group = key
        if name == TOKENS:
            token_type = labels.get("token_type", "")
            if token_type in row.tokens:
                row.tokens[token_type] += value
        elif name == COST:
            row.cost_usd += value
        else:
            row.requests += value
    kept = [r for r in rows.values() if not r.empty]
    for r in kept:
        r.cost_usd = float(usd(r.cost_usd))
    return sorted(kept, key=lambda r: (-r.cost_usd, r.group))


def total_row(rows: Sequence[Row], width: int) -> Row:
    out = Row((TOTAL,) * width)
    for r in rows:
        for t, v in r.tokens.items():
            out.tokens[t] += v
        out.requests += r.requests
    out.cost_usd = float(sum((usd(r.cost_usd) for r in rows), Decimal(0)))
    return out


def parse_by(text: str) -> tuple[str, ...]:
    """`team,namespace,model` → its labels, checked against GROUP_LABELS."""
    by = tuple(p.strip() for p in text.split(",") if p.strip())
    if not by:
        raise ValueError("name at least one label")
    unknown = [b for b in by if b not in GROUP_LABELS]
    if unknown:
        raise ValueError(f"unknown label(s) {', '.join(unknown)}; choose from "
                         f"{','.join(GROUP_LABELS)}")
    if len(set(by)) != len(by):
        raise ValueError(f"a label is named twice: {text}")
    return by
