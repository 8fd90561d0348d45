"""Tests for podtally.pricing.

Expected costs are computed by hand from the rates in the snapshot bundled with
genai-prices (genai_prices/data.py), quoted next to each case in USD per million tokens.
The standard rates used here are the same in genai-prices 0.0.61 and 0.2.3.  Only newer
releases (0.2.x) carry tier/batch rates and a separate reasoning rate; tests that need
the pinned release has none, and tests whose outcome depends on it say so.  Tier rates
in 0.2.3 start on 2026-10-12 (flex/priority) and 2026-10-14 (batch), so most cases use
a November 2026 timestamp.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from podtally.pricing import (
    PROVIDER_MAP,
    TABLE_HAS_REASONING_RATES,
    TABLE_HAS_TIER_RATES,
    Price,
    PriceBook,
    PricingConfigError,
    load_overrides,
    normalize_tier,
)

AT = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
BEFORE_TIER_DATA = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)

MINI = "gpt-4o-mini-2024-07-18"
MINI_TOKENS = {"input": 1200, "cache_read": 800, "output": 350}
O3 = "o3-2025-04-16"
O3_TOKENS = {"input": 500, "cache_read": 1000, "output": 200, "reasoning": 1800}
SONNET4 = "claude-sonnet-4-20250514"
SONNET4_TOKENS = {"input": 100, "cache_write": 4735, "cache_read": 2000, "output": 255}
HAIKU45 = "claude-haiku-4-5-20251001"
HAIKU45_TOKENS = {"input": 1000, "cache_write": 2000, "cache_read": 4000, "output": 300}


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook()




def usd(value: str) -> Decimal:
    return Decimal(value)


def assert_cost(price: Price, expected: str) -> None:
    assert price.cost == usd(expected), (price.cost, expected)
    assert price.cost_usd == pytest.approx(float(expected))
    assert price.cost_usd_str == expected


# --------------------------------------------------------------------------- table prices


def test_gpt_4o_mini_input_cached_output(book: PriceBook) -> None:
    # gpt-4o-mini: input 0.15, cache read 0.075, output 0.6
    # 1200*0.15 + 800*0.075 + 350*0.6 = 180 + 60 + 210 = 450 / 1e6
    price = book.price("openai", MINI, MINI_TOKENS, None, AT)
    assert_cost(price, "0.00045")
    assert price.priced
    assert price.source == "genai-prices"
    assert price.matched == "gpt-4o-mini"
    assert (price.requested_tier, price.applied_tier, price.tier_basis) == (
        "standard",
        "standard",
        "exact",
    )
    assert price.note is None


def test_claude_sonnet_4_cache_write_and_read(book: PriceBook) -> None:
    # claude-sonnet-4-0: input 3, cache write 3.75, cache read 0.3, output 15
    # 100*3 + 4735*3.75 + 2000*0.3 + 255*15 = 300 + 17756.25 + 600 + 3825 = 22481.25 / 1e6
    price = book.price("anthropic", SONNET4, SONNET4_TOKENS, None, AT)
    assert_cost(price, "0.02248125")
    assert price.matched == "claude-sonnet-4-0"


def test_o3_reasoning_billed_at_output_rate(book: PriceBook) -> None:
    # o3 from 2025-06-10: input 2, cache read 0.5, output 8 (no separate reasoning rate)
    # 500*2 + 1000*0.5 + (200+1800)*8 = 1000 + 500 + 16000 = 17500 / 1e6
    price = book.price("openai", O3, O3_TOKENS, None, AT)
    assert_cost(price, "0.0175")


def test_timestamp_selects_historical_price(book: PriceBook) -> None:
    # o3 before 2025-06-10: input 10, cache read 0.5, output 40
    # 500*10 + 1000*0.5 + 2000*40 = 5000 + 500 + 80000 = 85500 / 1e6
    price = book.price("openai", O3, O3_TOKENS, None, datetime(2025, 5, 1, tzinfo=UTC))
    assert_cost(price, "0.0855")


def test_separate_reasoning_rate_when_table_has_one(book: PriceBook) -> None:
    # genai-prices provider ids pass through exactly. perplexity sonar-deep-research:
    # input 2, output 8, and (0.2.x only) reasoning 3.
    tokens = {"input": 1000, "output": 100, "reasoning": 1000}
    price = book.price("perplexity", "sonar-deep-research", tokens, None, AT)
    if TABLE_HAS_REASONING_RATES:
        assert_cost(price, "0.0058")  # 1000*2 + 100*8 + 1000*3 = 5800
    else:
        assert_cost(price, "0.0108")  # 1000*2 + (100+1000)*8 = 10800


def test_bedrock_cross_region_profile(book: PriceBook) -> None:
    # aws regional.anthropic.claude-3-haiku-20240307-v1:0: input 0.25, output 1.25
    tokens = {"input": 1000, "output": 1000}
    for model in (
        "anthropic.claude-3-haiku-20240307-v1:0",
        "us.anthropic.claude-3-haiku-20240307-v1:0",
    ):
        price = book.price("aws.bedrock", model, tokens, None, AT)
        assert_cost(price, "0.0015")
        assert price.matched == "regional.anthropic.claude-3-haiku-20240307-v1:0"


def test_azure_falls_back_to_openai_models(book: PriceBook) -> None:
    price = book.price("azure.ai.openai", MINI, MINI_TOKENS, None, AT)
    assert_cost(price, "0.00045")


def test_vertex_claude(book: PriceBook) -> None:
    # google claude-4-sonnet: input 3, output 15 -> 3000 + 15000
    price = book.price("gcp.vertex_ai", "claude-sonnet-4@20250514", {"input": 1000, "output": 1000})
    assert_cost(price, "0.018")


def test_every_mapped_provider_resolves(book: PriceBook) -> None:
    samples = {
        "openai": "gpt-4o",
        "azure.ai.openai": "gpt-4o",
        "anthropic": "claude-3-haiku-20240307",
        "gcp.gemini": "gemini-2.5-flash",
        "gcp.vertex_ai": "gemini-2.5-flash",
        "aws.bedrock": "amazon.nova-lite-v1:0",
        "cohere": "command-r-plus-08-2024",
        "mistral_ai": "mistral-large-latest",
        "groq": "llama-3.3-70b-versatile",
        "deepseek": "deepseek-chat",
        "x_ai": "grok-3",
    }
    assert set(samples) | {"ollama", "openai_compatible"} == set(PROVIDER_MAP)
    for provider, model in samples.items():
        price = book.price(provider, model, {"input": 1_000_000}, None, AT)
        assert price.priced, (provider, model, price.note)
        assert price.cost > 0, (provider, model)


# --------------------------------------------------------------------------- unpriced


@pytest.mark.parametrize(
    ("provider", "model", "reason"),
    [
        ("openai", "gpt-does-not-exist-9", "no price for model"),
        ("made-up-provider", "gpt-4o", "unknown provider"),
        ("ollama", "llama3.1:8b", "self-hosted"),
        # must not be priced as OpenAI even though the name contains "openai"
        ("openai_compatible", "gpt-4o-mini", "self-hosted"),
        ("openai", "", "empty model"),
    ],
)
def test_unpriced(book: PriceBook, provider: str, model: str, reason: str) -> None:
    price = book.price(provider, model, {"input": 10_000, "output": 10_000}, "flex", AT)
    assert price.cost == 0
    assert price.cost_usd == 0.0
    assert price.cost_usd_str == "0"
    assert not price.priced
    assert price.source == "unpriced"
    assert price.applied_tier is None
    assert price.requested_tier == "flex"
    assert price.note is not None and reason in price.note


# --------------------------------------------------------------------------- tiers


@pytest.mark.parametrize("tier", [None, "default", "auto", "standard", "DEFAULT", " auto "])
def test_standard_aliases(book: PriceBook, tier: str | None) -> None:
    price = book.price("openai", MINI, MINI_TOKENS, tier, AT)
    assert_cost(price, "0.00045")
    assert (price.requested_tier, price.applied_tier, price.tier_basis) == (
        "standard",
        "standard",
        "exact",
    )


def test_openai_flex_derived_before_table_has_tier_rates(book: PriceBook) -> None:
    # No tier rates before 2026-10-12 -> OpenAI flex = batch = 50% of standard 17500
    price = book.price("openai", O3, O3_TOKENS, "flex", BEFORE_TIER_DATA)
    assert_cost(price, "0.00875")
    assert (price.applied_tier, price.tier_basis) == ("flex", "derived")
    assert price.note is not None and "50%" in price.note


def test_openai_batch_derived_before_table_has_tier_rates(book: PriceBook) -> None:
    price = book.price("openai", O3, O3_TOKENS, "batch", BEFORE_TIER_DATA)
    assert_cost(price, "0.00875")
    assert (price.applied_tier, price.tier_basis) == ("batch", "derived")


def test_openai_flex_without_flex_rate_uses_batch_rate(book: PriceBook) -> None:
    price = book.price("openai", MINI, MINI_TOKENS, "flex", AT)
    if TABLE_HAS_TIER_RATES:
        # gpt-4o-mini has no flex variant; its batch variant is input 0.075, output 0.3
        # (cache read stays 0.075): 1200*0.075 + 800*0.075 + 350*0.3 = 90 + 60 + 105 = 255
        assert_cost(price, "0.000255")
        assert price.note is not None and "table batch rate" in price.note
    else:
        # no tier data at all: 50% of standard 450
        assert_cost(price, "0.000225")
        assert price.note is not None and "50%" in price.note
    assert (price.applied_tier, price.tier_basis) == ("flex", "derived")


def test_anthropic_batch_derived_when_table_has_no_batch_rate(book: PriceBook) -> None:
    # claude-sonnet-4-0 has no batch variant -> 50% of 22481.25
    price = book.price("anthropic", SONNET4, SONNET4_TOKENS, "batch", AT)
    assert_cost(price, "0.011240625")
    assert (price.applied_tier, price.tier_basis) == ("batch", "derived")


def test_anthropic_priority_falls_back_to_standard(book: PriceBook) -> None:
    # standard haiku 4.5: 1000*1 + 2000*1.25 + 4000*0.1 + 300*5 = 5400
    price = book.price("anthropic", HAIKU45, HAIKU45_TOKENS, "priority", AT)
    assert_cost(price, "0.0054")
    assert price.requested_tier == "priority"
    assert (price.applied_tier, price.tier_basis) == ("standard", "fallback")
    assert price.note is not None and "priority" in price.note


@pytest.mark.parametrize("tier", ["scale", "something-new"])
def test_openai_unknown_rate_tier_falls_back(book: PriceBook, tier: str) -> None:
    price = book.price("openai", MINI, MINI_TOKENS, tier, AT)
    assert_cost(price, "0.00045")
    assert (price.requested_tier, price.applied_tier, price.tier_basis) == (
        tier,
        "standard",
        "fallback",
    )


def test_openai_priority_without_rate_falls_back(book: PriceBook) -> None:
    # Priority rates are per model, there is no multiplier to derive them from.
    price = book.price("openai", O3, O3_TOKENS, "priority", BEFORE_TIER_DATA)
    assert_cost(price, "0.0175")
    assert (price.applied_tier, price.tier_basis) == ("standard", "fallback")


def test_batch_multiplier_not_invented_for_other_providers(book: PriceBook) -> None:
    # Bedrock has no batch rates in the table and no multiplier is applied.
    tokens = {"input": 1000, "output": 1000}
    model = "us.anthropic.claude-3-haiku-20240307-v1:0"
    price = book.price("aws.bedrock", model, tokens, "batch", AT)
    assert_cost(price, "0.0015")
    assert (price.applied_tier, price.tier_basis) == ("standard", "fallback")


def test_azure_tier_variants_not_applied_via_fallback(book: PriceBook) -> None:
    price = book.price("azure.ai.openai", MINI, MINI_TOKENS, "priority", AT)
    assert_cost(price, "0.00045")
    assert (price.applied_tier, price.tier_basis) == ("standard", "fallback")


def test_tiers_without_table_rates() -> None:
    # Whatever the genai-prices version: a table without tier data gives the documented
    # multipliers for OpenAI/Anthropic batch and OpenAI flex, and standard otherwise.
    assert not TABLE_HAS_TIER_RATES, "pinned genai-prices gained tier rates: revisit these tests"
    book = PriceBook()
    haiku = book.price("anthropic", HAIKU45, HAIKU45_TOKENS, "batch", AT)
    assert_cost(haiku, "0.0027")  # 50% of 5400
    assert (haiku.applied_tier, haiku.tier_basis) == ("batch", "derived")
    o3 = book.price("openai", O3, O3_TOKENS, "priority", AT)
    assert_cost(o3, "0.0175")
    assert (o3.applied_tier, o3.tier_basis) == ("standard", "fallback")
    gemini = book.price("gcp.gemini", "gemini-2.5-flash", {"input": 1000, "output": 1000}, "batch")
    assert_cost(gemini, "0.0028")  # 1000*0.3 + 1000*2.5, no multiplier for Google
    assert (gemini.applied_tier, gemini.tier_basis) == ("standard", "fallback")


def test_normalize_tier() -> None:
    assert normalize_tier(None) == "standard"
    assert normalize_tier("auto") == "standard"
    assert normalize_tier("Flex") == "flex"
    assert normalize_tier("batch") == "batch"


# --------------------------------------------------------------------------- tokens


def test_missing_buckets_count_zero(book: PriceBook) -> None:
    # gpt-4o-mini output only: 1000 * 0.6
    assert_cost(book.price("openai", MINI, {"output": 1000}, None, AT), "0.0006")
    assert book.price("openai", MINI, {}, None, AT).cost == 0


@pytest.mark.parametrize(
    "tokens",
    [
        {"prompt": 1},
        {"input": -1},
        {"input": 1.5},
        {"input": True},
    ],
)
def test_bad_tokens_rejected(book: PriceBook, tokens: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="bucket"):
        book.price("openai", MINI, tokens, None, AT)


def test_naive_timestamp_is_utc(book: PriceBook) -> None:
    naive = book.price("openai", O3, O3_TOKENS, "flex", AT.replace(tzinfo=None))
    assert naive == book.price("openai", O3, O3_TOKENS, "flex", AT)


def test_time_of_day_pricing_uses_utc(book: PriceBook) -> None:
    # deepseek-chat: input 0.27 between 00:30 and 16:30 UTC, 0.135 otherwise
    tokens = {"input": 1_000_000}
    assert_cost(
        book.price("deepseek", "deepseek-chat", tokens, None, datetime(2026, 11, 1, 1)), "0.27"
    )
    assert_cost(
        book.price("deepseek", "deepseek-chat", tokens, None, datetime(2026, 11, 1, 20)), "0.135"
    )
    # 21:00 at UTC+8 is 13:00 UTC: peak
    plus8 = datetime(2026, 11, 1, 21, tzinfo=timezone(timedelta(hours=8)))
    assert_cost(book.price("deepseek", "deepseek-chat", tokens, None, plus8), "0.27")


def test_default_timestamp_is_now(book: PriceBook) -> None:
    price = book.price("openai", MINI, MINI_TOKENS)
    assert price.priced


def test_lookup_cache(tmp_path: Path) -> None:
    book = PriceBook(cache_size=2)
    for _ in range(3):
        book.price("openai", MINI, MINI_TOKENS, None, AT)
    info = book.cache_info()
    assert (info.misses, info.hits, info.maxsize) == (1, 2, 2)


# --------------------------------------------------------------------------- offline


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(*args: object, **kwargs: object) -> Any:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield


def test_offline_and_ignores_auto_updated_snapshot(no_network: None, tmp_path: Path) -> None:
    from genai_prices import data_snapshot

    book = PriceBook()
    expected = book.price("openai", MINI, MINI_TOKENS, None, AT)
    assert_cost(expected, "0.00045")

    # A snapshot installed by genai-prices' UpdatePrices (e.g. started by another
    # library in the process) must not change podtally's prices.
    fake = data_snapshot.DataSnapshot(providers=[], from_auto_update=True)
    data_snapshot.set_custom_snapshot(fake)
    try:
        assert PriceBook().price("openai", MINI, MINI_TOKENS, None, AT) == expected
        assert book.price("openai", O3, O3_TOKENS, "flex", AT).priced
    finally:
        data_snapshot.set_custom_snapshot(None)

    assert not any(t.name == "genai_prices:update" for t in threading.enumerate())
    assert book.table_version.startswith("genai-prices ")


# --------------------------------------------------------------------------- overrides


OVERRIDES_YAML = """
models:
  - provider: openai_compatible
    model: meta-llama/Llama-3.1-8B-Instruct
    usd_per_mtok: {input: 0.1, cache_read: 0.05, cache_write: 0.1, output: 0.2, reasoning: 0.2}
  - provider: ollama
    model: "llama3*"
    usd_per_mtok: {input: 0, output: 0}
  - provider: "*"
    model: "gpt-4o-mini*"
    usd_per_mtok: {input: 9, output: 9}
  - provider: openai
    model: gpt-4o-mini-2024-07-18
    usd_per_mtok: {input: 1, output: 2}
    tiers:
      batch: {input: 0.5, output: 1, cache_read: 0.25}
  - provider: openai_compatible
    model: "qwen/*"
    usd_per_mtok: {input: "0.3", output: "0.6", reasoning: 1.2}
"""


@pytest.fixture
def override_book(tmp_path: Path) -> PriceBook:
    path = tmp_path / "prices.yaml"
    path.write_text(OVERRIDES_YAML)
    return PriceBook(path)


def test_override_self_hosted_model(override_book: PriceBook) -> None:
    # 1000*0.1 + 2000*0.05 + 1000*0.1 + 500*0.2 + 300*0.2 = 100+100+100+100+60 = 460
    tokens = {
        "input": 1000,
        "cache_read": 2000,
        "cache_write": 1000,
        "output": 500,
        "reasoning": 300,
    }
    price = override_book.price(
        "openai_compatible", "meta-llama/Llama-3.1-8B-Instruct", tokens, None, AT
    )
    assert_cost(price, "0.00046")
    assert price.priced
    assert price.source == "override"
    assert price.matched == "meta-llama/Llama-3.1-8B-Instruct"
    assert (price.applied_tier, price.tier_basis) == ("standard", "exact")


def test_override_model_match_is_case_sensitive(override_book: PriceBook) -> None:
    price = override_book.price(
        "openai_compatible", "meta-llama/llama-3.1-8b-instruct", {"input": 1}
    )
    assert not price.priced


def test_override_glob_and_zero_price_is_priced(override_book: PriceBook) -> None:
    price = override_book.price("ollama", "llama3.1:8b", {"input": 1000, "output": 1000}, None, AT)
    assert price.priced
    assert price.cost == 0
    assert price.matched == "llama3*"


def test_override_defaults(override_book: PriceBook) -> None:
    # cache_read/cache_write default to input 0.3, reasoning given 1.2, output 0.6
    # 1000*0.3 + 1000*0.3 + 1000*0.3 + 1000*0.6 + 1000*1.2 = 2700
    tokens = dict.fromkeys(("input", "cache_read", "cache_write", "output", "reasoning"), 1000)
    price = override_book.price("openai_compatible", "qwen/Qwen3-8B", tokens, None, AT)
    assert_cost(price, "0.0027")


def test_override_wins_over_table_and_exact_beats_glob(override_book: PriceBook) -> None:
    # exact openai entry: 1200*1 + 800*1 (cache_read defaults to input) + 350*2 = 2700
    price = override_book.price("openai", MINI, MINI_TOKENS, None, AT)
    assert_cost(price, "0.0027")
    assert price.source == "override"
    # the glob covers other providers: 9 * (1200 + 800) + 9 * 350 = 21150
    assert_cost(override_book.price("azure.ai.openai", MINI, MINI_TOKENS, None, AT), "0.02115")
    # models without an override still come from the table
    assert_cost(override_book.price("openai", O3, O3_TOKENS, None, AT), "0.0175")


def test_override_tiers(override_book: PriceBook) -> None:
    # batch override: 1200*0.5 + 800*0.25 + 350*1 = 600 + 200 + 350 = 1150
    price = override_book.price("openai", MINI, MINI_TOKENS, "batch", AT)
    assert_cost(price, "0.00115")
    assert (price.applied_tier, price.tier_basis) == ("batch", "exact")
    flex = override_book.price("openai", MINI, MINI_TOKENS, "flex", AT)
    assert_cost(flex, "0.0027")
    assert (flex.applied_tier, flex.tier_basis) == ("standard", "fallback")


def test_override_json(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(
        '{"models": [{"provider": "openai_compatible", "model": "m",'
        ' "usd_per_mtok": {"input": 1, "output": 3}}]}'
    )
    price = PriceBook(path).price("openai_compatible", "m", {"input": 1000, "output": 1000})
    assert_cost(price, "0.004")


def test_empty_overrides_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert PriceBook(path).override_count == 0


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        (
            "models:\n  - {provider: x, model: y, usd_per_mtok: {input: -1, output: 1}}\n",
            ".yaml",
            "models.0.usd_per_mtok.input: Input should be greater than or equal to 0",
        ),
        (
            "models:\n  - {provider: x, model: y, usd_per_mtok: {input: 1}}\n",
            ".yaml",
            "models.0.usd_per_mtok.output: Field required",
        ),
        (
            "models:\n  - {provider: x, model: y,"
            " usd_per_mtok: {input: 1, output: 1, inputs: 2}}\n",
            ".yaml",
            "models.0.usd_per_mtok.inputs: Extra inputs are not permitted",
        ),
        (
            "models:\n  - {provider: x, model: y, usd_per_mtok: {input: cheap, output: 1}}\n",
            ".yaml",
            "models.0.usd_per_mtok.input: Input should be a valid decimal",
        ),
        (
            "models:\n  - {provider: x, model: y, usd_per_mtok: {input: .nan, output: 1}}\n",
            ".yaml",
            "models.0.usd_per_mtok.input",
        ),
        (
            "models:\n  - {provider: '', model: y, usd_per_mtok: {input: 1, output: 1}}\n",
            ".yaml",
            "models.0.provider",
        ),
        (
            "models:\n  - {provider: x, model: y, usd_per_mtok: {input: 1, output: 1},"
            " tiers: {turbo: {input: 1, output: 1}}}\n",
            ".yaml",
            "unknown tier 'turbo'",
        ),
        (
            "models:\n"
            "  - {provider: x, model: y, usd_per_mtok: {input: 1, output: 1}}\n"
            "  - {provider: x, model: y, usd_per_mtok: {input: 2, output: 2}}\n",
            ".yaml",
            "models[1] repeats provider='x' model='y'",
        ),
        ("model:\n  - {}\n", ".yaml", "model: Extra inputs are not permitted"),
        ("- provider: x\n", ".yaml", "top level must be a mapping"),
        ("models: [\n", ".yaml", "cannot parse price overrides"),
        ('{"models": [}', ".json", "cannot parse price overrides"),
    ],
)
def test_bad_overrides_file(tmp_path: Path, content: str, suffix: str, message: str) -> None:
    path = tmp_path / f"prices{suffix}"
    path.write_text(content)
    with pytest.raises(PricingConfigError) as info:
        PriceBook(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_missing_overrides_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(PricingConfigError, match="cannot read price overrides"):
        load_overrides(path)
    assert issubclass(PricingConfigError, ValueError)


def test_table_error_is_reported_as_unpriced(
    book: PriceBook, monkeypatch: pytest.MonkeyPatch
) -> None:
    from genai_prices.types import ModelInfo

    def broken(*args: object, **kwargs: object) -> Any:
        raise ValueError("Invalid usage data")

    monkeypatch.setattr(ModelInfo, "calc_price", broken)
    price = book.price("openai", MINI, MINI_TOKENS, None, AT)
    assert not price.priced
    assert price.cost == 0
    assert price.matched == "gpt-4o-mini"
    assert price.note is not None and "Invalid usage data" in price.note
