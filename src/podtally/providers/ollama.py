"""Ollama's native API: /api/chat and /api/generate, one JSON object or NDJSON lines; the
final object (`done: true`) carries the counts. `prompt_eval_count` is absent when the
whole prompt came from Ollama's cache: those tokens were not evaluated, and count 0."""

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
