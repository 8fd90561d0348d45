"""Ollama's native API: /api/chat and /api/generate, one JSON object or NDJSON lines; the
final object (`done: true`) carries the counts. Since ollama#5371 `prompt_eval_count` is the
whole prompt, cached part included; newer servers add `prompt_eval_cached_count`, which the
contract's Ollama row leaves inside `input`. Servers before that fix omitted
`prompt_eval_count` when the whole prompt came from the cache: then it counts 0."""

from __future__ import annotations

from typing import Any

from podtally.providers.base import BaseAccumulator, as_dict, as_int, text
from podtally.usage import Tokens


class OllamaAccumulator(BaseAccumulator):
    def on_object(self, event: str, obj: dict[str, Any]) -> None:
        model = text(obj.get("model"))
        if model:
            self.usage.model = model
        if as_dict(obj.get("message")).get("content") or obj.get("response"):
            self.saw_output = True
        if obj.get("done") is True:
            self.ended = True
        if "prompt_eval_count" in obj or "eval_count" in obj:
            self.usage.tokens = Tokens(input=as_int(obj.get("prompt_eval_count")),
                                       output=as_int(obj.get("eval_count")))
        if isinstance(obj.get("error"), str):
            self.usage.parse_error = "provider error"
