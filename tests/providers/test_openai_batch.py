"""OpenAI Batch output files: one metered call per result line, at batch prices.

Real files from testdata (see SOURCES.md) are fed whole, in 7-byte slices and byte by byte;
files that are not batch results (an input file, a fine-tuning file, an error JSON body,
binary content) give no call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from podtally.pricing import PriceBook
from podtally.providers.openai_batch import BatchLine
from podtally.providers.registry import CallSpec, detect, operation_for

DATA = Path(__file__).parent / "testdata"
CASES = ["openai-batch-output", "openai-batch-output-mini", "openai-batch-error"]


def spec_for(path: str = "/v1/files/file-abc/content", provider: str = "openai") -> CallSpec:
    spec = detect(provider, "GET", path, b"")
    assert spec is not None
    return spec


def parse(body: bytes, split: int | None = None, ctype: str = "application/octet-stream",
          complete: bool = True) -> tuple[list[BatchLine], Any]:
    parser = spec_for().parser(ctype, {"content-type": ctype})
    step = split or max(len(body), 1)
    for i in range(0, len(body), step):
        parser.feed(body[i : i + step])
    usage = parser.finish(complete=complete)
    return list(parser.acc.lines), usage


@pytest.mark.parametrize(
    ("provider", "method", "path", "expected"),
    [
        ("openai", "GET", "/v1/files/file-abc/content", "batch"),
        ("openai", "GET", "/v1/files/file-abc/content?x=1", "batch"),
        ("azure.ai.openai", "GET", "/openai/files/file-abc/content?api-version=2024-10-21", "batch"),
        ("openai", "GET", "/v1/files/file-abc", None),  # the file object, not its content
        ("openai", "GET", "/v1/files", None),
        ("openai", "POST", "/v1/files", None),  # an upload
        ("openai", "DELETE", "/v1/files/file-abc", None),
        ("openai", "GET", "/v1/batches/batch_abc", None),
        ("openai", "POST", "/v1/batches", None),
        ("anthropic", "GET", "/v1/files/file-abc/content", None),
        ("gcp.gemini", "GET", "/v1/files/file-abc/content", None),
    ],
)
def test_only_openai_file_content_downloads_are_batch_candidates(
        provider: str, method: str, path: str, expected: str | None) -> None:
    spec = detect(provider, method, path, b"")
    assert (spec.operation if spec else None) == expected
    assert operation_for(provider, path, method) == expected
    if spec is not None:
        assert spec.family == "openai_batch" and spec.stream is True and spec.request_model is None


@pytest.mark.parametrize("split", [None, 7, 1], ids=["whole", "7-bytes", "1-byte"])
@pytest.mark.parametrize("case", CASES)
def test_recorded_files_give_one_call_per_line(case: str, split: int | None) -> None:
    body = (DATA / f"{case}.jsonl").read_bytes()
    expected = json.loads((DATA / f"{case}.expected-calls.json").read_text())
    lines, usage = parse(body, split)
    assert len(lines) == len(expected["calls"]) == len(body.strip().splitlines())
    for line, exp in zip(lines, expected["calls"], strict=True):
        u = line.usage
        assert u.model == exp["model"]
        assert u.service_tier == exp["service_tier"] == "batch"  # even where the body says "default"
        assert u.response_id == exp["response_id"]
        assert line.operation == exp["operation"]
        assert line.status == exp["status"]
        assert line.request_id == exp["request_id"]
        if exp["tokens"] is None:
            assert u.tokens is None
        else:
            assert u.tokens is not None and u.tokens.as_dict() == exp["tokens"]
    assert usage.parse_error is None  # the download's own usage: nothing wrong with the file


def test_batch_price_is_half_the_standard_price() -> None:
    lines, _ = parse((DATA / "openai-batch-output.jsonl").read_bytes())
    book = PriceBook()
    for line in lines:
        assert line.usage.model and line.usage.tokens
        tokens = line.usage.tokens.as_dict()
        standard = book.price("openai", line.usage.model, tokens)
        batch = book.price("openai", line.usage.model, tokens, line.usage.service_tier)
        assert batch.priced and batch.applied_tier == "batch" and standard.applied_tier == "standard"
        assert batch.cost_usd == pytest.approx(standard.cost_usd / 2)


def _line(case: str, n: int = 0) -> dict[str, Any]:
    return json.loads((DATA / f"{case}.jsonl").read_bytes().splitlines()[n])


def test_lines_with_errors() -> None:
    ok = _line("openai-batch-output")
    # An expired line, in the error-file shape OpenAI documents: no response at all.
    expired = {"id": ok["id"], "custom_id": ok["custom_id"], "response": None,
               "error": {"code": "batch_expired",
                         "message": "This request could not be executed before the completion window expired."}}
    # A 500 for one request: a response without a body.
    no_body = {**ok, "response": {"status_code": 500, "request_id": "r-500"}}
    # A status-less response with a body: the line is not known to have succeeded.
    no_status = {**ok, "response": {k: v for k, v in ok["response"].items() if k != "status_code"}}
    # A result whose body has no usage.
    no_usage = json.loads(json.dumps(ok))
    del no_usage["response"]["body"]["usage"]
    body = b"".join(json.dumps(o).encode() + b"\n" for o in (expired, no_body, no_status, no_usage))
    lines, _ = parse(body)
    assert [ln.status for ln in lines] == ["error", "500", "error", "200"]
    assert [ln.request_id for ln in lines] == [None, "r-500", ok["response"]["request_id"],
                                               ok["response"]["request_id"]]
    assert lines[0].usage.tokens is None and lines[0].usage.model is None
    assert lines[1].usage.tokens is None and lines[1].usage.service_tier == "batch"
    assert lines[2].usage.tokens is not None and lines[2].usage.tokens.output == 10
    assert lines[3].usage.tokens is None and lines[3].usage.model == "gpt-4o-2024-08-06"
    assert all(ln.usage.service_tier == "batch" for ln in lines[1:])


@pytest.mark.parametrize(
    ("obj_type", "operation"),
    [("chat.completion", "chat"), ("response", "chat"), ("text_completion", "text_completion"),
     ("list", "embeddings"), ("something.new", "chat")],
)
def test_operation_follows_the_body_object(obj_type: str, operation: str) -> None:
    line = _line("openai-batch-output")
    line["response"]["body"]["object"] = obj_type
    (got,), _ = parse(json.dumps(line).encode() + b"\n")
    assert got.operation == operation


def test_responses_api_usage_in_a_batch_line() -> None:
    # /v1/responses results carry Responses-API usage; the body is the recorded Responses
    # object from the golden cases, placed in the recorded line's envelope.
    line = _line("openai-batch-output")
    line["response"]["body"] = json.loads((DATA / "openai-responses-reasoning.response.json").read_text())
    expected = json.loads((DATA / "openai-responses-reasoning.expected.json").read_text())
    (got,), _ = parse(json.dumps(line).encode() + b"\n")
    assert got.usage.tokens is not None and got.usage.tokens.as_dict() == expected["tokens"]
    assert got.usage.service_tier == "batch" and got.operation == "chat"


def test_embeddings_in_a_batch_line() -> None:
    line = _line("openai-batch-output")
    line["response"]["body"] = json.loads((DATA / "openai-embeddings.response.json").read_text())
    expected = json.loads((DATA / "openai-embeddings.expected.json").read_text())
    (got,), _ = parse(json.dumps(line).encode() + b"\n")
    assert got.operation == "embeddings"
    assert got.usage.tokens is not None and got.usage.tokens.as_dict() == expected["tokens"]


def test_batch_input_file_is_not_metered() -> None:
    # A batch *input* file: every line has custom_id, but none is a result.
    lines, _ = parse((DATA / "openai-batch-input.jsonl").read_bytes())
    assert lines == []


@pytest.mark.parametrize(
    "body",
    [
        # A fine-tuning file (chat format lines).
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n' * 3,
        # The API's error body for a missing file (pretty-printed JSON).
        json.dumps({"error": {"message": "No such File object: file-abc", "type": "invalid_request_error",
                              "param": "id", "code": None}}, indent=2).encode(),
        # Binary content (an uploaded PDF or image).
        b"%PDF-1.7\n\xff\xd8\xff\xe0\x00\x10JFIF\x00\n" * 50,
        b"",
        b"\n\n\n",
        b'[{"custom_id": "request-1"}]\n',  # not an object per line
    ],
    ids=["fine-tune", "error-json", "binary", "empty", "blank-lines", "array"],
)
def test_non_batch_content_is_ignored(body: bytes) -> None:
    for split in (None, 7):
        lines, _ = parse(body, split)
        assert lines == []


def test_malformed_lines_are_skipped_and_the_rest_counted() -> None:
    good = (DATA / "openai-batch-output.jsonl").read_bytes().splitlines()
    body = good[0] + b"\n" + b'{"id": "batch_req_x", "custom_id": "r", "respo\n' + good[1] + b"\n"
    lines, usage = parse(body)
    assert [ln.usage.response_id for ln in lines] == [
        "chatcmpl-AsrFpsrYeo17mxD0lRQVLvWFnB1iD", "chatcmpl-AsrFubq2PakFui7XmWwpzr4Q0C9kW"]
    assert usage.parse_error  # the bad line is visible on the download


def test_truncated_download_keeps_the_complete_lines() -> None:
    body = (DATA / "openai-batch-output.jsonl").read_bytes()
    cut = body[: body.index(b"\n") + 200]  # the first line and part of the second
    lines, usage = parse(cut, complete=False)
    assert len(lines) == 1 and lines[0].usage.tokens is not None
    assert usage.parse_error
