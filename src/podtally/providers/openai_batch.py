"""OpenAI Batch output files: each JSONL line is one call, billed at batch prices.

Metered when a workload downloads the output file (GET /v1/files/{id}/content) through the
sidecar; a file whose lines are not batch results is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from podtally.providers.base import BaseAccumulator, as_dict, text
from podtally.providers.openai import tokens_from_usage
from podtally.usage import CallUsage

_OPERATIONS = {
    "chat.completion": "chat",
    "response": "chat",
    "text_completion": "text_completion",
    "list": "embeddings",
}


@dataclass
class BatchLine:
    usage: CallUsage
    operation: str
    status: str
    request_id: str | None


class BatchOutputAccumulator(BaseAccumulator):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[BatchLine] = []

    def on_object(self, event: str, obj: dict[str, Any]) -> None:
        if "custom_id" not in obj or ("response" not in obj and "error" not in obj):
            return  # not a batch result line (a batch input file's lines have custom_id too)
        resp = as_dict(obj.get("response"))
        if not resp:
            self.lines.append(BatchLine(CallUsage(), "chat", "error", None))
            return
        body = as_dict(resp.get("body"))
        usage = body.get("usage")
        self.lines.append(BatchLine(
            CallUsage(
                model=text(body.get("model")),
                tokens=tokens_from_usage(usage) if isinstance(usage, dict) else None,
                service_tier="batch",
                response_id=text(body.get("id")),
            ),
            operation=_OPERATIONS.get(str(body.get("object")), "chat"),
            status=str(resp.get("status_code") or "error"),
            request_id=text(resp.get("request_id")),
        ))
