"""The report as FOCUS 1.3 cost-and-usage rows (FinOps Open Cost and Usage Specification; pure).

One row per charge: per day of the period (ChargePeriodStart/End, as usage-based charges
are recorded), at the finest grain the metrics carry — (namespace, workload, team, app,
service_account, provider, model) — whatever --by says: FinOps tools group by `Tags`
themselves, and a TOTAL row would be counted as a charge, so there is none.

Every Mandatory column of FOCUS 1.3 is present — ServiceProviderName and HostProviderName,
new in 1.3, and ProviderName and PublisherName, which 1.3 deprecates but still requires, so
1.2 readers find theirs — with the Recommended and Conditional ones podtally can fill;
custom columns carry the spec's `x_` prefix. Types as the spec says:
Decimal as plain numbers (no exponent, no separators), DateTime as `YYYY-MM-DDTHH:mm:ssZ`,
Tags a JSON object; an empty cell is null.

Mapping:
- ListCost = ContractedCost = the metered cost at the price table's list prices (podtally
  knows no negotiated price). Showback: BilledCost = EffectiveCost = ListCost. Chargeback
  (`--invoice`): BilledCost = EffectiveCost = the row's share of its provider's invoice,
  split by metered cost to the cent over every row of the provider in the period, so the
  BilledCost of a provider adds up to its invoice exactly.
- BillingPeriodStart/End = the report's [start, end); ChargePeriodStart/End = the day.
- ChargeCategory Usage, ChargeClass null (not a correction), ChargeFrequency Usage-Based,
  PricingCategory Standard.
- ConsumedQuantity = PricingQuantity = all tokens (the disjoint buckets' sum), units
  Tokens; SkuId = SkuPriceId = `<provider>/<model>`; the buckets and the call count are in
  x_ columns.
- ServiceProviderName = HostProviderName (the spec allows it when the hosting is not
  visible) = ProviderName = PublisherName = InvoiceIssuerName = ServiceName =
  BillingAccountId/Name = the provider (`gen_ai.provider.name`): podtally cannot see the
  account the provider bills.
- ServiceCategory "AI and Machine Learning", ServiceSubcategory "Generative AI".
- ResourceId `<namespace>/<workload>`, ResourceName the workload, ResourceType "Kubernetes
  Workload"; SubAccountId/Name the namespace, SubAccountType "Kubernetes Namespace".
- Tags: JSON of app, namespace, service_account, team, workload.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta
from decimal import Decimal

from podtally.report.build import Report
from podtally.report.chargeback import split_invoices
from podtally.report.period import iso
from podtally.report.render import count, usd_dec
from podtally.report.rows import ID_LABELS, Row, usd

VERSION = "1.3"
GRAIN = (*ID_LABELS, "provider", "model")

COLUMNS = (
    "BilledCost", "BillingAccountId", "BillingAccountName", "BillingCurrency",
    "BillingPeriodEnd", "BillingPeriodStart", "ChargeCategory", "ChargeClass",
    "ChargeDescription", "ChargeFrequency", "ChargePeriodEnd", "ChargePeriodStart",
    "ConsumedQuantity", "ConsumedUnit", "ContractedCost", "EffectiveCost", "HostProviderName",
    "InvoiceIssuerName", "ListCost", "PricingCategory", "PricingQuantity", "PricingUnit",
    "ProviderName", "PublisherName", "ResourceId", "ResourceName", "ResourceType",
    "ServiceCategory", "ServiceName", "ServiceProviderName", "ServiceSubcategory", "SkuId",
    "SkuPriceId", "SubAccountId", "SubAccountName", "SubAccountType", "Tags",
)
CUSTOM_COLUMNS = {
    "x_Requests": "requests",
    "x_TokensInput": "input",
    "x_TokensCacheRead": "cache_read",
    "x_TokensCacheWrite": "cache_write",
    "x_TokensOutput": "output",
    "x_TokensReasoning": "reasoning",
}


def charges(report: Report) -> list[tuple[int, Row]]:
    """(day, row) of every charge: rows at GRAIN per day that used tokens or cost money
    (calls that failed without usage are no charge)."""
    out = []
    for day in range(report.days):
        out += [(day, r) for r in report.rows_on_day(day, GRAIN)
                if r.tokens_total or r.cost_usd]
    return out


def focus_csv(report: Report) -> str:
    found = charges(report)
    billed: dict[tuple[int, tuple[str, ...]], Decimal] = {}
    if report.invoices:
        costs: dict[str, dict[tuple[int, tuple[str, ...]], Decimal]] = {}
        for day, r in found:
            costs.setdefault(r.group[GRAIN.index("provider")], {})[(day, r.group)] = \
                usd(r.cost_usd)
        billed = split_invoices(costs, report.invoices)

    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=[*COLUMNS, *CUSTOM_COLUMNS], lineterminator="\n")
    w.writeheader()
    start, end = iso(report.period.start), iso(report.period.end)
    for day, row in found:
        g = dict(zip(GRAIN, row.group, strict=True))
        provider, model = g["provider"], g["model"]
        list_cost = usd(row.cost_usd)
        cost = usd_dec(billed.get((day, row.group), list_cost))
        tokens = count(row.tokens_total)
        day_start = report.period.start + timedelta(days=day)
        day_end = min(day_start + timedelta(days=1), report.period.end)
        w.writerow({
            "BilledCost": cost,
            "BillingAccountId": provider,
            "BillingAccountName": provider,
            "BillingCurrency": "USD",
            "BillingPeriodEnd": end,
            "BillingPeriodStart": start,
            "ChargeCategory": "Usage",
            "ChargeClass": "",
            "ChargeDescription": f"LLM tokens of {model} ({provider}) metered by podtally",
            "ChargeFrequency": "Usage-Based",
            "ChargePeriodEnd": iso(day_end),
            "ChargePeriodStart": iso(day_start),
            "ConsumedQuantity": tokens,
            "ConsumedUnit": "Tokens",
            "ContractedCost": usd_dec(list_cost),
            "EffectiveCost": cost,
            "HostProviderName": provider,
            "InvoiceIssuerName": provider,
            "ListCost": usd_dec(list_cost),
            "PricingCategory": "Standard",
            "PricingQuantity": tokens,
            "PricingUnit": "Tokens",
            "ProviderName": provider,
            "PublisherName": provider,
            "ResourceId": f"{g['namespace']}/{g['workload']}",
            "ResourceName": g["workload"],
            "ResourceType": "Kubernetes Workload",
            "ServiceCategory": "AI and Machine Learning",
            "ServiceName": provider,
            "ServiceProviderName": provider,
            "ServiceSubcategory": "Generative AI",
            "SkuId": f"{provider}/{model}",
            "SkuPriceId": f"{provider}/{model}",
            "SubAccountId": g["namespace"],
            "SubAccountName": g["namespace"],
            "SubAccountType": "Kubernetes Namespace",
            "Tags": json.dumps({k: g[k] for k in sorted(ID_LABELS)}, separators=(",", ":")),
            **{col: count(row.requests if key == "requests" else row.tokens[key])
               for col, key in CUSTOM_COLUMNS.items()},
        })
    return out.getvalue()
