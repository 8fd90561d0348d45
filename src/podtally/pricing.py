"""USD cost of one metered LLM call.

Prices come from pydantic's ``genai-prices`` package, using **only the snapshot bundled
inside the installed package** (``genai_prices.data.providers``).  This module never
touches ``genai_prices.UpdatePrices`` (the opt-in background downloader) and never goes
through ``genai_prices.calc_price`` / ``data_snapshot.get_snapshot()``, which would honour a
snapshot fetched from the network by some other library running ``UpdatePrices`` in the
same process.  Pricing is therefore offline and deterministic for a given package version.

An optional overrides file (YAML or JSON) can set prices for models the table does not
know (self-hosted models behind ``openai_compatible``/``ollama``) or replace table prices
(negotiated rates).  Overrides always win over the table.

Token buckets are *disjoint*::

    billed input  = input + cache_read + cache_write
    billed output = output + reasoning

Reasoning tokens are billed at the output rate unless the table (or an override) has a
separate reasoning rate.

Works with genai-prices 0.0.x (no tier/batch rates, no separate reasoning rate) and 0.2.x
(which has both); :data:`TABLE_HAS_TIER_RATES` / :data:`TABLE_HAS_REASONING_RATES` say
which the installed version offers.

Service tiers: the table's tier rate is used when it has one for the model at the request
time; otherwise a documented multiplier is applied where the provider documents one
(OpenAI Batch API and Anthropic Message Batches: 50 % of standard; OpenAI flex: billed at
Batch API rates); otherwise the standard rate is charged.  :class:`Price` records which
tier's rate was applied and how it was obtained.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from fnmatch import fnmatchcase
from functools import lru_cache
from pathlib import Path
from typing import Any, Final, Literal

import genai_prices
import yaml
from genai_prices.data import providers as _BUNDLED_PROVIDERS
from genai_prices.types import ModelInfo, Provider, Usage
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "BUCKETS",
    "TABLE_HAS_REASONING_RATES",
    "TABLE_HAS_TIER_RATES",
    "PROVIDER_MAP",
    "TIERS",
    "OverrideEntry",
    "OverridesFile",
    "Price",
    "PriceBook",
    "PricingConfigError",
    "TokenRates",
    "load_overrides",
    "normalize_tier",
    "parse_overrides",
]

#: The disjoint token buckets accepted by :meth:`PriceBook.price`.
BUCKETS: Final = ("input", "cache_read", "cache_write", "output", "reasoning")
_BUCKET_SET: Final = frozenset(BUCKETS)

#: Normalised tier names (besides ``"standard"``) that may carry their own rates.
TIERS: Final = ("flex", "priority", "scale", "batch", "fast")

#: OpenTelemetry ``gen_ai.provider.name`` -> genai-prices provider id.  ``None`` means the
#: provider has no public price list (self-hosted / unknown upstream): unpriced unless an
#: override matches.
PROVIDER_MAP: Final[Mapping[str, str | None]] = {
    "openai": "openai",
    "azure.ai.openai": "azure",  # genai-prices' azure falls back to openai's models
    "anthropic": "anthropic",
    "gcp.gemini": "google",
    "gcp.vertex_ai": "google",  # google falls back to anthropic for Claude on Vertex
    "aws.bedrock": "aws",
    "cohere": "cohere",
    "mistral_ai": "mistral",
    "groq": "groq",
    "deepseek": "deepseek",
    "x_ai": "x-ai",
    "ollama": None,
    "openai_compatible": None,
}

_MTOK: Final = Decimal(1_000_000)
_HALF: Final = Decimal("0.5")
_STANDARD_ALIASES: Final = frozenset({"", "standard", "default", "auto", "on_demand"})

PriceSource = Literal["genai-prices", "override", "unpriced"]
TierBasis = Literal["exact", "derived", "fallback"]


class PricingConfigError(ValueError):
    """The overrides file cannot be read, parsed or validated."""


# --------------------------------------------------------------------------- result


@dataclass(frozen=True, slots=True)
class Price:
    """Cost of one call.

    ``cost`` is the exact Decimal; :attr:`cost_usd` (float, for metrics) and
    :attr:`cost_usd_str` (plain decimal string, for records) are derived from it.
    """

    cost: Decimal
    """Exact cost in USD (``0`` when unpriced)."""
    priced: bool
    """False when no price is known for the model (cost is then 0)."""
    source: PriceSource
    """Where the rates came from."""
    matched: str | None
    """The genai-prices model id, or the override's ``model`` pattern, that was used."""
    requested_tier: str
    """Normalised requested tier: ``standard``, ``flex``, ``priority``, ``scale``, ``batch``,
    ``fast``, or the lower-cased unknown value as given."""
    applied_tier: str | None
    """Tier whose rates were charged (``standard`` on fallback); None when unpriced."""
    tier_basis: TierBasis
    """``exact``: the requested tier's rates came from the table/override;
    ``derived``: from a documented provider multiplier; ``fallback``: the requested tier has
    no known rate, so the standard rate was charged."""
    note: str | None = None
    """Human-readable explanation for derived/fallback/unpriced results."""

    @property
    def cost_usd(self) -> float:
        """Cost as a float, for metrics."""
        return float(self.cost)

    @property
    def cost_usd_str(self) -> str:
        """Cost as a plain decimal string without exponent or trailing zeros, for records."""
        return _decimal_str(self.cost)


def _decimal_str(value: Decimal) -> str:
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


# --------------------------------------------------------------------------- overrides


class TokenRates(BaseModel):
    """USD per million tokens for each bucket.

    ``cache_read`` and ``cache_write`` default to ``input``; ``reasoning`` defaults to
    ``output``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: Decimal = Field(ge=0, allow_inf_nan=False)
    output: Decimal = Field(ge=0, allow_inf_nan=False)
    cache_read: Decimal | None = Field(default=None, ge=0, allow_inf_nan=False)
    cache_write: Decimal | None = Field(default=None, ge=0, allow_inf_nan=False)
    reasoning: Decimal | None = Field(default=None, ge=0, allow_inf_nan=False)

    def cost(self, tokens: Mapping[str, int]) -> Decimal:
        total = (
            self.input * tokens["input"]
            + (self.input if self.cache_read is None else self.cache_read) * tokens["cache_read"]
            + (self.input if self.cache_write is None else self.cache_write) * tokens["cache_write"]
            + self.output * tokens["output"]
            + (self.output if self.reasoning is None else self.reasoning) * tokens["reasoning"]
        )
        return total / _MTOK


class OverrideEntry(BaseModel):
    """One model price override."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str = Field(min_length=1)
    """``gen_ai.provider.name`` value, exact or a glob (``*``)."""
    model: str = Field(min_length=1)
    """Model id as reported by the response, exact or a glob; case-sensitive."""
    usd_per_mtok: TokenRates
    """Standard rates."""
    tiers: dict[str, TokenRates] = Field(default_factory=dict)
    """Optional per-tier rates, keyed by tier name (flex, priority, scale, batch, fast)."""

    @field_validator("tiers")
    @classmethod
    def _check_tiers(cls, value: dict[str, TokenRates]) -> dict[str, TokenRates]:
        out: dict[str, TokenRates] = {}
        for key, rates in value.items():
            tier = normalize_tier(key)
            if tier not in TIERS:
                raise ValueError(
                    f"unknown tier {key!r}; expected one of {', '.join(TIERS)} "
                    "(standard rates go in usd_per_mtok)"
                )
            if tier in out:
                raise ValueError(f"tier {tier!r} given twice")
            out[tier] = rates
        return out

    @property
    def is_glob(self) -> bool:
        return _is_glob(self.provider) or _is_glob(self.model)


class OverridesFile(BaseModel):
    """Top level of the overrides file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[OverrideEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _no_duplicates(self) -> OverridesFile:
        seen: dict[tuple[str, str], int] = {}
        for index, entry in enumerate(self.models):
            key = (entry.provider, entry.model)
            if key in seen:
                raise ValueError(
                    f"models[{index}] repeats provider={entry.provider!r} model={entry.model!r} "
                    f"already given in models[{seen[key]}]"
                )
            seen[key] = index
        return self


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def parse_overrides(data: object, *, origin: str = "<overrides>") -> OverridesFile:
    """Validate already-decoded overrides data; raise :class:`PricingConfigError` if bad."""
    if data is None:
        return OverridesFile()
    if not isinstance(data, Mapping):
        raise PricingConfigError(
            f"{origin}: top level must be a mapping with a 'models' list, got {type(data).__name__}"
        )
    try:
        return OverridesFile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise PricingConfigError(f"{origin}: invalid price overrides: {problems}") from exc


def load_overrides(path: str | os.PathLike[str]) -> OverridesFile:
    """Read and validate an overrides file (``.json`` as JSON, anything else as YAML)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PricingConfigError(f"{file}: cannot read price overrides: {exc}") from exc
    data: object
    try:
        data = json.loads(text) if file.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise PricingConfigError(f"{file}: cannot parse price overrides: {exc}") from exc
    return parse_overrides(data, origin=str(file))


# --------------------------------------------------------------------------- tiers


def normalize_tier(service_tier: str | None) -> str:
    """Map a reported service tier to a normalised name.

    ``None``, ``default``, ``auto`` and ``standard`` are all ``standard`` (``auto`` is a
    request setting; the response normally reports the tier actually used).
    """
    if service_tier is None:
        return "standard"
    tier = service_tier.strip().lower()
    return "standard" if tier in _STANDARD_ALIASES else tier


def _price_context(tier: str) -> dict[str, str]:
    # genai-prices keys batch as a submission mode, the rest as service_tier.
    if tier == "batch":
        return {"processing": "batch"}
    return {"service_tier": tier}


# --------------------------------------------------------------------------- lookup


@dataclass(frozen=True, slots=True)
class _Unpriced:
    reason: str


@dataclass(frozen=True, slots=True)
class _Table:
    provider: Provider
    model: ModelInfo
    owned: bool  # model belongs to provider itself (not via fallback): tier variants apply


_Resolved = OverrideEntry | _Table | _Unpriced

_PROVIDERS_BY_ID: Final[Mapping[str, Provider]] = {p.id: p for p in _BUNDLED_PROVIDERS}


def _supports_tier_rates() -> bool:
    # genai-prices >= 0.1 carries per-request price variants (service tier, batch) selected
    # by a ``price_context``; 0.0.x has neither.
    fields = {f.name for f in dataclasses.fields(ModelInfo)}
    params = inspect.signature(ModelInfo.calc_price).parameters
    return "price_variants" in fields and "price_context" in params


def _supports_reasoning_rates() -> bool:
    # Newer genai-prices know an ``output_reasoning_tokens`` unit (a part of output_tokens);
    # 0.0.x's Usage dataclass rejects the keyword.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            Usage(output_reasoning_tokens=0)  # type: ignore[call-arg,unused-ignore]
    except (TypeError, UserWarning):
        return False
    return True


#: Whether the installed genai-prices has service-tier / batch rates at all.
TABLE_HAS_TIER_RATES: Final = _supports_tier_rates()
#: Whether the installed genai-prices can price reasoning tokens apart from output.
TABLE_HAS_REASONING_RATES: Final = _supports_reasoning_rates()


class PriceBook:
    """Prices calls from the bundled genai-prices table plus optional overrides.

    Build once at start-up; :meth:`price` is pure and cheap (per ``(provider, model)``
    lookups are cached in an LRU of ``cache_size`` entries).
    """

    def __init__(
        self,
        overrides_path: str | os.PathLike[str] | None = None,
        *,
        cache_size: int = 4096,
    ) -> None:
        overrides = load_overrides(overrides_path) if overrides_path is not None else None
        self._exact: dict[tuple[str, str], OverrideEntry] = {}
        self._globs: list[OverrideEntry] = []
        for entry in overrides.models if overrides is not None else ():
            if entry.is_glob:
                self._globs.append(entry)
            else:
                self._exact[(entry.provider, entry.model)] = entry
        self._resolve = lru_cache(maxsize=cache_size)(self._resolve_uncached)

    @property
    def table_version(self) -> str:
        """Identifies the price table, e.g. ``genai-prices 0.2.3``."""
        return f"genai-prices {genai_prices.__version__}"

    @property
    def override_count(self) -> int:
        return len(self._exact) + len(self._globs)

    def price(
        self,
        provider: str,
        model: str,
        tokens: Mapping[str, int],
        service_tier: str | None = None,
        at: datetime | None = None,
    ) -> Price:
        """Cost of one call.

        Args:
            provider: ``gen_ai.provider.name`` (see :data:`PROVIDER_MAP`).
            model: model id as reported by the response.
            tokens: disjoint buckets from :data:`BUCKETS`; missing buckets count 0.
            service_tier: tier reported by the response (or ``"batch"`` for batch APIs).
            at: request time (naive = UTC); ``None`` means now.

        Raises:
            ValueError: on an unknown bucket or a negative / non-integer count.
        """
        counts = _check_tokens(tokens)
        tier = normalize_tier(service_tier)
        resolved = self._resolve(provider, model)
        if isinstance(resolved, OverrideEntry):
            return _price_override(resolved, counts, tier)
        if isinstance(resolved, _Unpriced):
            return Price(
                cost=Decimal(0),
                priced=False,
                source="unpriced",
                matched=None,
                requested_tier=tier,
                applied_tier=None,
                tier_basis="exact",
                note=resolved.reason,
            )
        when = datetime.now(UTC) if at is None else _as_utc(at)
        try:
            return _price_table(resolved, counts, tier, when)
        except (ArithmeticError, LookupError, TypeError, ValueError) as exc:
            # A malformed table entry must not break metering: report it as unpriced.
            return Price(
                cost=Decimal(0),
                priced=False,
                source="unpriced",
                matched=resolved.model.id,
                requested_tier=tier,
                applied_tier=None,
                tier_basis="exact",
                note=f"genai-prices could not price {resolved.model.id}: {exc}",
            )

    def cache_info(self) -> Any:
        """``functools`` cache statistics of the (provider, model) lookup."""
        return self._resolve.cache_info()

    # -- lookup --------------------------------------------------------------

    def _resolve_uncached(self, provider: str, model: str) -> _Resolved:
        entry = self._exact.get((provider, model))
        if entry is not None:
            return entry
        for entry in self._globs:
            if fnmatchcase(provider, entry.provider) and fnmatchcase(model, entry.model):
                return entry
        if not model:
            return _Unpriced("empty model id")
        if provider in PROVIDER_MAP:
            gp_id = PROVIDER_MAP[provider]
            if gp_id is None:
                return _Unpriced(f"provider {provider!r} has no public prices (self-hosted)")
        elif provider in _PROVIDERS_BY_ID:
            gp_id = provider  # already a genai-prices id; exact match only, never fuzzy
        else:
            return _Unpriced(f"unknown provider {provider!r}")
        gp_provider = _PROVIDERS_BY_ID.get(gp_id)
        if gp_provider is None:
            return _Unpriced(f"genai-prices has no provider {gp_id!r}")
        info = gp_provider.find_model(model, all_providers=_BUNDLED_PROVIDERS)
        if info is None:
            return _Unpriced(f"no price for model {model!r} at {gp_id}")
        owned = any(m is info for m in gp_provider.models)
        return _Table(provider=gp_provider, model=info, owned=owned)


def _check_tokens(tokens: Mapping[str, int]) -> dict[str, int]:
    counts = dict.fromkeys(BUCKETS, 0)
    for key, value in tokens.items():
        if key not in _BUCKET_SET:
            raise ValueError(f"unknown token bucket {key!r}; expected {', '.join(BUCKETS)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"token bucket {key!r} must be a non-negative int, got {value!r}")
        counts[key] = value
    return counts


def _price_override(entry: OverrideEntry, counts: Mapping[str, int], tier: str) -> Price:
    tier_rates = entry.tiers.get(tier)
    basis: TierBasis
    note: str | None
    if tier_rates is not None:
        rates, applied, basis, note = tier_rates, tier, "exact", None
    elif tier == "standard":
        rates, applied, basis, note = entry.usd_per_mtok, "standard", "exact", None
    else:
        rates, applied, basis = entry.usd_per_mtok, "standard", "fallback"
        note = f"override has no {tier!r} rates; standard rate charged"
    return Price(
        cost=rates.cost(counts),
        priced=True,
        source="override",
        matched=entry.model,
        requested_tier=tier,
        applied_tier=applied,
        tier_basis=basis,
        note=note,
    )


def _as_utc(at: datetime) -> datetime:
    # genai-prices 0.0.x compares dates/times of the timestamp as given: make it UTC.
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _variant_active(info: ModelInfo, context: Mapping[str, str], at: datetime) -> bool:
    """Whether the table has a non-empty rate variant for ``context`` at ``at``.

    Mirrors ``ModelInfo.get_prices``: a variant applies when all its ``when`` keys equal
    the context and its date constraint (if any) is active.
    """
    if not TABLE_HAS_TIER_RATES:
        return False
    variants: Any = getattr(info, "price_variants", None)
    for variant in variants or ():
        if variant.constraint is not None and not variant.constraint.active(at):
            continue
        if not all(context.get(key) == value for key, value in variant.when.items()):
            continue
        if any(value is not None for value in variant.prices.__dict__.values()):
            return True
    return False


def _table_cost(
    resolved: _Table, usage: Usage, at: datetime, context: Mapping[str, str] | None
) -> Decimal:
    if context is None:
        return resolved.model.calc_price(
            usage, resolved.provider, genai_request_timestamp=at
        ).total_price
    # Only reached when TABLE_HAS_TIER_RATES; typed loosely for genai-prices 0.0.x.
    model: Any = resolved.model
    total: Decimal = model.calc_price(
        usage, resolved.provider, genai_request_timestamp=at, price_context=context
    ).total_price
    return total


def _price_table(resolved: _Table, counts: Mapping[str, int], tier: str, at: datetime) -> Price:
    # genai-prices' input/output totals include their cache / reasoning parts.
    fields = {
        "input_tokens": counts["input"] + counts["cache_read"] + counts["cache_write"],
        "cache_read_tokens": counts["cache_read"],
        "cache_write_tokens": counts["cache_write"],
        "output_tokens": counts["output"] + counts["reasoning"],
    }
    if TABLE_HAS_REASONING_RATES and counts["reasoning"]:
        fields["output_reasoning_tokens"] = counts["reasoning"]
    usage = Usage(**fields)
    gp_id = resolved.provider.id
    matched = resolved.model.id

    def result(cost: Decimal, applied: str, basis: TierBasis, note: str | None) -> Price:
        return Price(
            cost=cost,
            priced=True,
            source="genai-prices",
            matched=matched,
            requested_tier=tier,
            applied_tier=applied,
            tier_basis=basis,
            note=note,
        )

    if tier == "standard":
        return result(_table_cost(resolved, usage, at, None), "standard", "exact", None)

    context = _price_context(tier)
    if resolved.owned and _variant_active(resolved.model, context, at):
        return result(_table_cost(resolved, usage, at, context), tier, "exact", None)

    # No table rate for this tier: documented provider multipliers only.
    if tier == "flex" and gp_id == "openai":
        batch = _price_context("batch")
        if resolved.owned and _variant_active(resolved.model, batch, at):
            return result(
                _table_cost(resolved, usage, at, batch),
                "flex",
                "derived",
                "no flex rate in table; OpenAI bills flex at Batch API rates (table batch rate)",
            )
        return result(
            _table_cost(resolved, usage, at, None) * _HALF,
            "flex",
            "derived",
            "no flex rate in table; OpenAI bills flex at Batch API rates (50% of standard)",
        )
    if tier == "batch" and gp_id in ("openai", "anthropic"):
        return result(
            _table_cost(resolved, usage, at, None) * _HALF,
            "batch",
            "derived",
            f"no batch rate in table; {gp_id} batch API is 50% of standard",
        )
    return result(
        _table_cost(resolved, usage, at, None),
        "standard",
        "fallback",
        f"no {tier!r} rate for {matched} at {gp_id}; standard rate charged",
    )
