"""Showback to chargeback: attribution coverage, invoices split by metered cost (pure).

Coverage is the share of metered cost whose team is known (not `unattributed`, not empty):
the number that tells Finance whether the metered split is trustworthy enough to charge.

Chargeback (`--invoice openai=12345.67,...`): each provider's invoice is split over the
report's groups in proportion to their metered cost at that provider, to the cent, by the
largest-remainder method, so the shares add up to the invoice exactly. A provider with
metered cost but no invoice is charged at its metered estimate (and shown as such); an
invoice for a provider with no metered cost cannot be split and is an error.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, TypeVar

from podtally.report.rows import usd

if TYPE_CHECKING:
    from podtally.report.build import Report

CENT = Decimal("0.01")
UNATTRIBUTED = "unattributed"
UNKNOWN_TEAMS = frozenset({"", UNATTRIBUTED})

K = TypeVar("K", bound=Hashable)


def parse_invoices(text: str) -> dict[str, Decimal]:
    """`openai=12345.67,anthropic=890` → {provider: USD}; cents at most, none negative."""
    out: dict[str, Decimal] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        provider, sep, amount = part.partition("=")
        provider = provider.strip()
        if not sep or not provider:
            raise ValueError(f"not PROVIDER=AMOUNT: {part!r} (e.g. openai=12345.67)")
        try:
            value = Decimal(amount.strip())
        except InvalidOperation as err:
            raise ValueError(f"not an amount in USD: {amount.strip()!r} ({provider})") from err
        if not value.is_finite() or value < 0:
            raise ValueError(f"an invoice is a non-negative amount: {part!r}")
        if value != value.quantize(CENT):
            raise ValueError(f"an invoice is in cents: {part!r}")
        if provider in out:
            raise ValueError(f"two invoices for {provider}")
        out[provider] = value.quantize(CENT)
    if not out:
        raise ValueError("name at least one PROVIDER=AMOUNT")
    return out


def split(amount: Decimal, weights: Mapping[K, Decimal]) -> dict[K, Decimal]:
    """`amount` (whole cents) over the keys in proportion to `weights`, to the cent, adding
    up exactly: each key gets its share rounded down, and the cents left go to the largest
    remainders (ties: the larger weight, then the first key)."""
    total = sum(weights.values(), Decimal(0))
    if total <= 0:
        raise ValueError("nothing to split over")
    cents = int((amount / CENT).to_integral_value())
    exact = {k: cents * w / total for k, w in weights.items()}
    floor = {k: int(v) for k, v in exact.items()}
    left = cents - sum(floor.values())
    order = sorted(weights, key=lambda k: (-(exact[k] - floor[k]), -weights[k]))
    for k in order[:left]:
        floor[k] += 1
    return {k: floor[k] * CENT for k in weights}


@dataclass(frozen=True)
class Coverage:
    attributed_usd: Decimal
    unattributed_usd: Decimal

    @property
    def total_usd(self) -> Decimal:
        return self.attributed_usd + self.unattributed_usd

    @property
    def share(self) -> float | None:
        """Attributed share of cost, 0..1; None when nothing cost anything."""
        total = self.total_usd
        return float(self.attributed_usd / total) if total else None


def coverage(report: Report) -> Coverage:
    known = unknown = Decimal(0)
    for row in report.rows(("team",)):
        if row.group[0] in UNKNOWN_TEAMS:
            unknown += usd(row.cost_usd)
        else:
            known += usd(row.cost_usd)
    return Coverage(known, unknown)


def charged(report: Report, by: Sequence[str]) -> dict[tuple[str, ...], Decimal]:
    """What each group of `by` is charged: its share of every invoice, plus its metered cost
    at providers without one. Empty without invoices."""
    if not report.invoices:
        return {}
    per_provider: dict[str, dict[tuple[str, ...], Decimal]] = {}
    for row in report.rows((*by, "provider")):
        per_provider.setdefault(row.group[-1], {})[row.group[:-1]] = usd(row.cost_usd)
    return split_invoices(per_provider, report.invoices)


def split_invoices(costs: Mapping[str, Mapping[K, Decimal]], invoices: Mapping[str, Decimal]
                   ) -> dict[K, Decimal]:
    """{provider: {key: metered USD}} → {key: charged USD}: each invoiced provider's invoice
    split by `split`, the others at their metered cost."""
    out: dict[K, Decimal] = {}
    for provider, by_key in costs.items():
        shares = split(invoices[provider], by_key) if provider in invoices else by_key
        for key, value in shares.items():
            out[key] = out.get(key, Decimal(0)) + value
    return out


@dataclass(frozen=True)
class Variance:
    provider: str
    metered_usd: Decimal
    invoice_usd: Decimal | None  # None: no invoice given, charged at the metered estimate

    @property
    def variance_usd(self) -> Decimal | None:
        return None if self.invoice_usd is None else self.invoice_usd - self.metered_usd

    @property
    def variance_share(self) -> float | None:
        """(invoice − estimate) / estimate."""
        v = self.variance_usd
        return None if v is None or not self.metered_usd else float(v / self.metered_usd)


def variances(report: Report) -> list[Variance]:
    metered = {r.group[0]: usd(r.cost_usd) for r in report.rows(("provider",))}
    providers = sorted(set(metered) | set(report.invoices))
    return [Variance(p, metered.get(p, Decimal(0)), report.invoices.get(p)) for p in providers]


def check_invoices(report: Report) -> None:
    """An invoice must have metered cost to be split over; raises ValueError otherwise."""
    metered = {r.group[0]: r.cost_usd for r in report.rows(("provider",))}
    empty = sorted(p for p in report.invoices if not metered.get(p))
    if empty:
        known = ", ".join(sorted(p for p, c in metered.items() if c)) or "none"
        raise ValueError(f"no metered cost for {', '.join(empty)} in the period: its invoice "
                         f"cannot be split (providers with metered cost: {known})")
