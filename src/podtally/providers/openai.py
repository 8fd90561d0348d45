"""OpenAI and every OpenAI-shaped API: chat completions, legacy completions, embeddings,
Responses. Non-streamed bodies and SSE streams share one accumulator."""

from __future__ import annotations

from typing import Any

from podtally.providers.base import BaseAccumulator, as_dict, as_int, uncached
from podtally.usage import Tokens


def tokens_from_usage(usage: dict[str, Any], *, reasoning_in_completion: bool = True) -> Tokens:
    """OpenAI usage shapes into disjoint buckets (contract: token buckets table).

    OpenAI counts reasoning inside completion_tokens; xAI reports it beside them
    (`reasoning_in_completion=False`). Where the usage carries its own total, the total
    says which it is, whoever serves it (see `_reasoning_inside`).
    """
    if "prompt_cache_hit_tokens" in usage or "prompt_cache_miss_tokens" in usage:  # DeepSeek
        prompt = as_int(usage.get("prompt_tokens"))
        hit = as_int(usage.get("prompt_cache_hit_tokens"))
        miss = usage.get("prompt_cache_miss_tokens")
        completion = as_int(usage.get("completion_tokens"))
        details = as_dict(usage.get("completion_tokens_details"))
        reasoning = as_int(details.get("reasoning_tokens") or usage.get("reasoning_tokens"))
        if _reasoning_inside(usage, prompt, completion, reasoning, default=True):
            completion -= reasoning
        return Tokens(
            # prompt_tokens = hit + miss (DeepSeek's docs); a relay may drop the miss.
            input=as_int(miss) if miss is not None else max(prompt - hit, 0),
            cache_read=hit,
            output=completion,
            reasoning=reasoning,
        )
    if "input_tokens" in usage or "output_tokens" in usage:  # Responses API
        prompt = as_int(usage.get("input_tokens"))
        prompt_details = as_dict(usage.get("input_tokens_details"))
        completion = as_int(usage.get("output_tokens"))
        reasoning = as_int(as_dict(usage.get("output_tokens_details")).get("reasoning_tokens"))
    else:  # chat completions, legacy completions, embeddings
        prompt = as_int(usage.get("prompt_tokens"))
        prompt_details = as_dict(usage.get("prompt_tokens_details"))
        completion = as_int(usage.get("completion_tokens"))
        reasoning = as_int(
            as_dict(usage.get("completion_tokens_details")).get("reasoning_tokens")
        )
    # GPT-5.6 and later also report cache_write_tokens (billed at 1.25x input) beside the
    # reads. The contract's OpenAI row keeps them in `input` (input = prompt - cached,
    # cache_write = 0), so they are deliberately not split out; the README says so.
    cached = as_int(prompt_details.get("cached_tokens"))
    if _reasoning_inside(usage, prompt, completion, reasoning, default=reasoning_in_completion):
        completion -= reasoning
    return Tokens(input=uncached(prompt, cached), cache_read=cached, output=completion,
                  reasoning=reasoning)


def _reasoning_inside(
    usage: dict[str, Any], prompt: int, completion: int, reasoning: int, *, default: bool
) -> bool:
    """Whether completion_tokens (output_tokens) already contains the reasoning tokens.

    OpenAI's total is prompt + completion, reasoning inside; xAI's is prompt + completion +
    reasoning. A total matching one of the two decides; otherwise the provider's known
    convention, and a completion smaller than its reasoning cannot contain it.
    """
    if not reasoning:
        return False
    total = usage.get("total_tokens")
    if isinstance(total, int) and not isinstance(total, bool):
        if total == prompt + completion:
            return completion >= reasoning
        if total == prompt + completion + reasoning:
            return False
    return default and completion >= reasoning


class OpenAIAccumulator(BaseAccumulator):
    """Keeps the last value of each field: streams report running totals, never increments.

    Covers the OpenAI-shaped APIs too: Azure (whose first stream chunk has an empty model
    and only content-filter results), Groq (usage under `x_groq` in its last chunk), xAI
    (usage in a chunk before the last), DeepSeek (cache hit/miss counts), Mistral, vLLM.
    """

    def __init__(self, *, reasoning_in_completion: bool = True) -> None:
        super().__init__()
        self.reasoning_in_completion = reasoning_in_completion

    def on_object(self, event: str, obj: dict[str, Any]) -> None:
        # Responses API stream events wrap the response object; its deltas carry output.
        kind = obj.get("type")
        if isinstance(kind, str) and kind.startswith("response."):
            if kind.endswith(".delta"):
                self.saw_output = True
            elif kind in ("response.completed", "response.incomplete", "response.failed"):
                self.ended = True
            inner = obj.get("response")
            if isinstance(inner, dict):
                self._take(inner)
            return
        self._take(obj)
        if not self.saw_output:
            self.saw_output = _has_output(obj)

    def _take(self, obj: dict[str, Any]) -> None:
        model = obj.get("model")
        if isinstance(model, str) and model:
            self.usage.model = model
        rid = obj.get("id")
        if isinstance(rid, str) and rid:
            self.usage.response_id = rid
        tier = obj.get("service_tier")
        if isinstance(tier, str) and tier:
            self.usage.service_tier = tier
        usage = obj.get("usage")
        if not isinstance(usage, dict):
            usage = as_dict(obj.get("x_groq")).get("usage")
        if isinstance(usage, dict):
            self.usage.tokens = tokens_from_usage(
                usage, reasoning_in_completion=self.reasoning_in_completion)


def _has_output(obj: dict[str, Any]) -> bool:
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        choice = as_dict(choice)
        if choice.get("text"):  # legacy completions
            return True
        delta = as_dict(choice.get("delta"))
        if delta.get("content") or delta.get("tool_calls") or delta.get("refusal"):
            return True
        if delta.get("reasoning_content") or delta.get("reasoning"):
            return True
    return False
