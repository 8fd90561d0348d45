"""OpenAI-shaped usage arithmetic that the golden payloads do not reach.

The inputs here are small hand-made usage objects (not recordings): each pins one rule of
`tokens_from_usage`. Real payloads for the same rules are in the golden and excerpt cases.
"""

from __future__ import annotations

from typing import Any

import pytest

from podtally.providers.openai import tokens_from_usage


@pytest.mark.parametrize(
    ("usage", "inside_by_default", "expected"),
    [
        # total = prompt + completion: reasoning is inside completion, whoever serves it.
        pytest.param({"prompt_tokens": 10, "completion_tokens": 500, "total_tokens": 510,
                      "completion_tokens_details": {"reasoning_tokens": 100}},
                     False, (10, 400, 100), id="total-says-inside"),
        # total = prompt + completion + reasoning (xAI's way), even where completion is the
        # larger: beside, not inside.
        pytest.param({"prompt_tokens": 10, "completion_tokens": 500, "total_tokens": 610,
                      "completion_tokens_details": {"reasoning_tokens": 100}},
                     True, (10, 500, 100), id="total-says-beside"),
        # No total: the provider's convention, and a completion below its reasoning cannot
        # contain it.
        pytest.param({"prompt_tokens": 10, "completion_tokens": 500,
                      "completion_tokens_details": {"reasoning_tokens": 100}},
                     True, (10, 400, 100), id="no-total-default-inside"),
        pytest.param({"prompt_tokens": 10, "completion_tokens": 50,
                      "completion_tokens_details": {"reasoning_tokens": 100}},
                     True, (10, 50, 100), id="no-total-smaller-completion"),
        # Responses shape, same rule.
        pytest.param({"input_tokens": 10, "output_tokens": 500, "total_tokens": 610,
                      "output_tokens_details": {"reasoning_tokens": 100}},
                     True, (10, 500, 100), id="responses-total-says-beside"),
    ],
)
def test_reasoning_inside_or_beside(
    usage: dict[str, Any], inside_by_default: bool, expected: tuple[int, int, int]
) -> None:
    tokens = tokens_from_usage(usage, reasoning_in_completion=inside_by_default)
    assert (tokens.input, tokens.output, tokens.reasoning) == expected


def test_deepseek_hit_without_miss_keeps_the_input() -> None:
    # prompt_tokens = hit + miss (DeepSeek's docs); a relay that drops the miss must not
    # drop the uncached input with it.
    tokens = tokens_from_usage({"prompt_tokens": 100, "prompt_cache_hit_tokens": 80,
                                "completion_tokens": 10, "total_tokens": 110})
    assert tokens.as_dict() == {"input": 20, "cache_read": 80, "cache_write": 0,
                                "output": 10, "reasoning": 0}


def test_openai_cache_writes_stay_in_input() -> None:
    # The contract's OpenAI row: input = prompt - cached, cache_write = 0 (see README).
    tokens = tokens_from_usage({"input_tokens": 2600, "output_tokens": 0,
                                "input_tokens_details": {"cached_tokens": 2000,
                                                         "cache_write_tokens": 400}})
    assert (tokens.input, tokens.cache_read, tokens.cache_write) == (600, 2000, 0)


def test_cached_above_prompt_means_the_prompt_leaves_the_cache_out() -> None:
    # A subset cannot exceed its set: such a server counts the cached part apart, and
    # input = prompt - cached would go negative (a Prometheus counter refuses that).
    tokens = tokens_from_usage({"prompt_tokens": 5, "completion_tokens": 2,
                                "prompt_tokens_details": {"cached_tokens": 100}})
    assert (tokens.input, tokens.cache_read, tokens.output) == (5, 100, 2)


def test_negative_counts_count_zero() -> None:
    tokens = tokens_from_usage({"prompt_tokens": -3, "completion_tokens": -1})
    assert min(tokens.as_dict().values()) == 0
