"""The report as FOCUS 1.1 cost-and-usage rows (FinOps Open Cost and Usage Specification; pure).

One row per charge at the finest grain the metrics carry — (namespace, workload, team, app,
service_account, provider, model) — whatever --by says: FinOps tools group by `Tags`
themselves, and a TOTAL row would be counted as a charge, so there is none.

Mapping (podtally knows list-price usage, not the invoice):
- BilledCost = EffectiveCost = ListCost = ContractedCost = podtally_llm_cost_usd_total's
  increase (the bundled price table's list prices), BillingCurrency USD.
- BillingPeriod* and ChargePeriod* = the report's [start, end).
- ChargeCategory Usage, ChargeClass empty (not a correction), ChargeFrequency Usage-Based,
  PricingCategory Standard.
- ConsumedQuantity = PricingQuantity = all tokens (the disjoint buckets' sum), unit Tokens;
  the buckets and the call count are in x_ columns (the spec's prefix for custom columns).
- ProviderName = PublisherName = InvoiceIssuerName = ServiceName = the provider
  (`gen_ai.provider.name`); BillingAccountId/Name too, as podtally cannot see the account
  the provider bills.
- ServiceCategory "AI and Machine Learning", ServiceSubcategory "Generative AI", SkuId = model.
- ResourceId `<namespace>/<workload>`, ResourceName the workload, ResourceType
  "Kubernetes Workload"; SubAccountId/Name the namespace.
- Tags: JSON of app, namespace, service_account, team, workload.
"""

from __future__ import annotations

import csv
import io
import json

from podtally.report.build import Report
from podtally.report.period import iso
from podtally.report.render import count
from podtally.report.rows import ID_LABELS, usd_text

GRAIN = (*ID_LABELS, "provider", "model")

COLUMNS = (
    "BilledCost", "BillingAccountId", "BillingAccountName", "BillingCurrency",
    "BillingPeriodEnd", "BillingPeriodStart", "ChargeCategory", "ChargeClass",
    "ChargeDescription", "ChargeFrequency", "ChargePeriodEnd", "ChargePeriodStart",
    "ConsumedQuantity", "ConsumedUnit", "ContractedCost", "EffectiveCost",
    "InvoiceIssuerName", "ListCost", "PricingCategory", "PricingQuantity", "PricingUnit",
    "ProviderName", "PublisherName", "ResourceId", "ResourceName", "ResourceType",
    "ServiceCategory", "ServiceName", "ServiceSubcategory", "SkuId",
    "SubAccountId", "SubAccountName", "Tags",
)
CUSTOM_COLUMNS = {
    "x_Requests": "requests",
    "x_TokensInput": "input",
    "x_TokensCacheRead": "cache_read",
    "x_TokensCacheWrite": "cache_write",
    "x_TokensOutput": "output",
    "x_TokensReasoning": "reasoning",
}


def focus_csv(report: Report) -> str:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=[*COLUMNS, *CUSTOM_COLUMNS], lineterminator="\n")
    w.writeheader()
    start, end = iso(report.period.start), iso(report.period.end)
    for row in report.rows(GRAIN):
        if not row.tokens_total and not row.cost_usd:
            continue  # calls that used no tokens (errors) are no charge
        g = dict(zip(GRAIN, row.group, strict=True))
        provider, model = g["provider"], g["model"]
        cost = usd_text(row.cost_usd)
        tokens = count(row.tokens_total)
        w.writerow({
            "BilledCost": cost,
            "BillingAccountId": provider,
            "BillingAccountName": provider,
            "BillingCurrency": "USD",
            "BillingPeriodEnd": end,
            "BillingPeriodStart": start,
            "ChargeCategory": "Usage",
            "ChargeClass": "",
            "ChargeDescription": f"LLM tokens of {model} ({provider}) metered by podtally "
                                 "at list prices",
            "ChargeFrequency": "Usage-Based",
            "ChargePeriodEnd": end,
            "ChargePeriodStart": start,
            "ConsumedQuantity": tokens,
            "ConsumedUnit": "Tokens",
            "ContractedCost": cost,
            "EffectiveCost": cost,
            "InvoiceIssuerName": provider,
            "ListCost": cost,
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
            "ServiceSubcategory": "Generative AI",
            "SkuId": model,
            "SubAccountId": g["namespace"],
            "SubAccountName": g["namespace"],
            "Tags": json.dumps({k: g[k] for k in sorted(ID_LABELS)}, separators=(",", ":")),
            **{col: count(row.requests if key == "requests" else row.tokens[key])
               for col, key in CUSTOM_COLUMNS.items()},
        })
    return out.getvalue()
