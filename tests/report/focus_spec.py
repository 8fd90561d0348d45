"""FOCUS 1.3 Cost and Usage columns, transcribed from the specification, and a checker.

Source: the FinOps Open Cost and Usage Specification (FOCUS_Spec repository,
specification/datasets/cost_and_usage/columns/*.md, "Content Constraints" of each column:
feature level, data type, whether nulls are allowed, allowed values), and the attribute
rules for Decimal (NumericFormat), DateTime (ISO 8601 in UTC, `YYYY-MM-DDTHH:mm:ssZ`),
JSON (KeyValueFormat) and custom columns (`x_` prefix). 1.3 adds ServiceProviderName and
HostProviderName (Mandatory) and deprecates ProviderName and PublisherName, which it still
requires ("MUST be present"). Kept independent of podtally's writer: nothing here imports it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MANDATORY, RECOMMENDED, CONDITIONAL = "Mandatory", "Recommended", "Conditional"

SERVICE_CATEGORIES = frozenset({
    "AI and Machine Learning", "Analytics", "Business Applications", "Compute", "Databases",
    "Developer Tools", "Multicloud", "Identity", "Integration", "Internet of Things",
    "Management and Governance", "Media", "Migration", "Mobile", "Networking", "Security",
    "Storage", "Web", "Other"})
AI_SUBCATEGORIES = frozenset({
    "AI Platforms", "Bots", "Generative AI", "Machine Learning",
    "Natural Language Processing", "Other (AI and Machine Learning)"})


@dataclass(frozen=True)
class Column:
    level: str
    type: str  # Decimal, String, DateTime, JSON
    nulls: bool
    allowed: frozenset[str] | None = None


COLUMNS: dict[str, Column] = {
    "AllocatedMethodDetails": Column(CONDITIONAL, "JSON", True),
    "AllocatedMethodId": Column(CONDITIONAL, "String", True),
    "AllocatedResourceId": Column(CONDITIONAL, "String", True),
    "AllocatedResourceName": Column(CONDITIONAL, "String", True),
    "AllocatedTags": Column(CONDITIONAL, "JSON", True),
    "AvailabilityZone": Column(RECOMMENDED, "String", True),
    "BilledCost": Column(MANDATORY, "Decimal", False),
    "BillingAccountId": Column(MANDATORY, "String", False),
    "BillingAccountName": Column(MANDATORY, "String", True),
    "BillingAccountType": Column(CONDITIONAL, "String", True),
    "BillingCurrency": Column(MANDATORY, "String", False),
    "BillingPeriodEnd": Column(MANDATORY, "DateTime", False),
    "BillingPeriodStart": Column(MANDATORY, "DateTime", False),
    "CapacityReservationId": Column(CONDITIONAL, "String", True),
    "CapacityReservationStatus": Column(CONDITIONAL, "String", True),
    "ChargeCategory": Column(MANDATORY, "String", False,
                             frozenset({"Usage", "Purchase", "Tax", "Credit", "Adjustment"})),
    "ChargeClass": Column(MANDATORY, "String", True, frozenset({"Correction"})),
    "ChargeDescription": Column(MANDATORY, "String", True),
    "ChargeFrequency": Column(RECOMMENDED, "String", False,
                              frozenset({"One-Time", "Recurring", "Usage-Based"})),
    "ChargePeriodEnd": Column(MANDATORY, "DateTime", False),
    "ChargePeriodStart": Column(MANDATORY, "DateTime", False),
    "CommitmentDiscountCategory": Column(CONDITIONAL, "String", True),
    "CommitmentDiscountId": Column(CONDITIONAL, "String", True),
    "CommitmentDiscountName": Column(CONDITIONAL, "String", True),
    "CommitmentDiscountQuantity": Column(CONDITIONAL, "Decimal", True),
    "CommitmentDiscountStatus": Column(CONDITIONAL, "String", True),
    "CommitmentDiscountType": Column(CONDITIONAL, "String", True),
    "CommitmentDiscountUnit": Column(CONDITIONAL, "String", True),
    "ConsumedQuantity": Column(CONDITIONAL, "Decimal", True),
    "ConsumedUnit": Column(CONDITIONAL, "String", True),
    "ContractApplied": Column(CONDITIONAL, "JSON", True),
    "ContractedCost": Column(MANDATORY, "Decimal", False),
    "ContractedUnitPrice": Column(CONDITIONAL, "Decimal", True),
    "EffectiveCost": Column(MANDATORY, "Decimal", False),
    "HostProviderName": Column(MANDATORY, "String", True),
    "InvoiceId": Column(RECOMMENDED, "String", True),
    "InvoiceIssuerName": Column(MANDATORY, "String", False),
    "ListCost": Column(MANDATORY, "Decimal", False),
    "ListUnitPrice": Column(CONDITIONAL, "Decimal", True),
    "PricingCategory": Column(CONDITIONAL, "String", True,
                              frozenset({"Standard", "Dynamic", "Committed", "Other"})),
    "PricingCurrency": Column(CONDITIONAL, "String", True),
    "PricingCurrencyContractedUnitPrice": Column(CONDITIONAL, "Decimal", True),
    "PricingCurrencyEffectiveCost": Column(CONDITIONAL, "Decimal", True),
    "PricingCurrencyListUnitPrice": Column(CONDITIONAL, "Decimal", True),
    "PricingQuantity": Column(MANDATORY, "Decimal", True),
    "PricingUnit": Column(MANDATORY, "String", True),
    "ProviderName": Column(MANDATORY, "String", False),
    "PublisherName": Column(MANDATORY, "String", False),
    "RegionId": Column(CONDITIONAL, "String", True),
    "RegionName": Column(CONDITIONAL, "String", True),
    "ResourceId": Column(CONDITIONAL, "String", True),
    "ResourceName": Column(CONDITIONAL, "String", True),
    "ResourceType": Column(CONDITIONAL, "String", True),
    "ServiceCategory": Column(MANDATORY, "String", False, SERVICE_CATEGORIES),
    "ServiceName": Column(MANDATORY, "String", False),
    "ServiceProviderName": Column(MANDATORY, "String", False),
    "ServiceSubcategory": Column(RECOMMENDED, "String", False),
    "SkuId": Column(CONDITIONAL, "String", True),
    "SkuMeter": Column(CONDITIONAL, "String", True),
    "SkuPriceDetails": Column(CONDITIONAL, "JSON", True),
    "SkuPriceId": Column(CONDITIONAL, "String", True),
    "SubAccountId": Column(CONDITIONAL, "String", True),
    "SubAccountName": Column(CONDITIONAL, "String", True),
    "SubAccountType": Column(CONDITIONAL, "String", True),
    "Tags": Column(CONDITIONAL, "JSON", True),
}
MANDATORY_COLUMNS = frozenset(k for k, c in COLUMNS.items() if c.level == MANDATORY)

_DECIMAL = re.compile(r"-?\d+(\.\d+)?")
_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_CURRENCY = re.compile(r"[A-Z]{3}")


def problems(header: Sequence[str], rows: Sequence[Mapping[str, str]]) -> list[str]:
    """Every way the CSV breaks the spec's column rules; [] when it conforms."""
    out: list[str] = []
    missing = MANDATORY_COLUMNS - set(header)
    if missing:
        out.append(f"mandatory columns missing: {sorted(missing)}")
    unknown = [h for h in header if h not in COLUMNS and not h.startswith("x_")]
    if unknown:
        out.append(f"columns neither FOCUS nor x_-prefixed: {unknown}")
    for n, row in enumerate(rows, 2):
        for name, col in COLUMNS.items():
            if name not in row:
                continue
            value = row[name]
            where = f"line {n} {name}={value!r}"
            if value == "":
                if not col.nulls:
                    out.append(f"{where}: must not be null")
                continue
            if col.type == "Decimal" and not _DECIMAL.fullmatch(value):
                out.append(f"{where}: not a Decimal in NumericFormat")
            elif col.type == "DateTime" and not _DATETIME.fullmatch(value):
                out.append(f"{where}: not a DateTime (YYYY-MM-DDTHH:mm:ssZ)")
            elif col.type == "JSON":
                try:
                    doc = json.loads(value)
                except ValueError:
                    doc = None
                if not isinstance(doc, dict) or not all(
                        isinstance(v, str | int | float | bool) or v is None
                        for v in doc.values()):
                    out.append(f"{where}: not a flat JSON object (KeyValueFormat)")
            if col.allowed is not None and value not in col.allowed:
                out.append(f"{where}: not one of the allowed values")
        if row.get("BillingCurrency") and not _CURRENCY.fullmatch(row["BillingCurrency"]):
            out.append(f"line {n}: BillingCurrency is not an ISO 4217 code")
        if row.get("ServiceCategory") == "AI and Machine Learning" and \
                row.get("ServiceSubcategory") not in AI_SUBCATEGORIES:
            out.append(f"line {n}: ServiceSubcategory not a child of its ServiceCategory")
        if not (row.get("BillingPeriodStart", "") <= row.get("ChargePeriodStart", "")
                < row.get("ChargePeriodEnd", "") <= row.get("BillingPeriodEnd", "")):
            out.append(f"line {n}: charge period not within the billing period")
        if row.get("ChargeCategory") == "Usage" and row.get("ChargeClass") != "Correction":
            for name in ("ConsumedQuantity", "ConsumedUnit", "PricingCategory"):
                if name in row and not row[name]:
                    out.append(f"line {n}: {name} must not be null for a Usage charge")
        if row.get("ConsumedQuantity") and "SkuPriceId" in row and not row["SkuPriceId"]:
            out.append(f"line {n}: ConsumedQuantity without a SkuPriceId")
    return out
