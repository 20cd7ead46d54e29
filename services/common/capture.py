"""What capture keeps of a request and of its answer: redacted copies. Pure.

A request is kept as the JSON a replay sends again (``ChatRequest`` fields, id and metadata
that say how to deliver left out, the tenant kept only as its hash on the row), every text in it
redacted (services/common/redact.py): the messages' text and text parts, tool calls'
arguments, the tools' descriptions, ``user``, tags and metadata values. An image part
is kept as a text part ``[IMAGE]``: an image may show anything, and capture keeps no pixels.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from schemas.control import CapturedPayload
from schemas.v1 import ChatRequest
from services.common.redact import redact
from services.common.sql import tenant_hash

IMAGE_MARK = "[IMAGE]"


def _text(value: str, counts: Counter[str]) -> str:
    return redact(value, counts)[0]


def _content(content: Any, counts: Counter[str]) -> Any:
    if isinstance(content, str):
        return _text(content, counts)
    if not isinstance(content, list):
        return content
    parts = []
    for part in content:
        if part.get("type") == "text":
            parts.append({**part, "text": _text(part.get("text", ""), counts)})
        else:
            counts["image"] += 1
            parts.append({"type": "text", "text": IMAGE_MARK})
    return parts


def redacted_request(request: ChatRequest) -> tuple[dict[str, Any], Counter[str]]:
    """The request as a replay sends it, with every text redacted; what was replaced."""
    counts: Counter[str] = Counter()
    body = request.model_dump(
        mode="json",
        exclude_none=True,
        exclude={"request_id": True, "metadata": {"idempotency_key", "deadline_ms"}},
    )
    for message in body.get("messages", []):
        if "content" in message:
            message["content"] = _content(message["content"], counts)
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            if "arguments" in function:
                function["arguments"] = _text(function["arguments"], counts)
    for tool in body.get("tools") or []:
        function = tool.get("function") or {}
        if "description" in function:
            function["description"] = _text(function["description"], counts)
    if isinstance(body.get("user"), str):
        body["user"] = _text(body["user"], counts)
    meta = body.get("metadata") or {}
    meta.pop("tenant", None)  # rows keep its hash
    for key, value in list(meta.items()):  # tags and OpenAI metadata are the caller's text too
        if isinstance(value, str):
            meta[key] = _text(value, counts)
        elif isinstance(value, dict):
            meta[key] = {k: _text(v, counts) if isinstance(v, str) else v for k, v in value.items()}
    return body, counts


def input_record(request: ChatRequest, tier: str, rule: str, config_hash: str) -> CapturedPayload:
    body, counts = redacted_request(request)
    return CapturedPayload(
        request_id=request.request_id,
        tenant_hash=tenant_hash(request.metadata.tenant),
        tier=tier,
        rule=rule,
        config_hash=config_hash,
        kind="input",
        text=json.dumps(body, separators=(",", ":"), ensure_ascii=False),
        redactions=dict(counts),
    )


def output_record(
    request: ChatRequest, tier: str, rule: str, config_hash: str, model: str, answer: str
) -> CapturedPayload:
    text, counts = redact(answer)
    return CapturedPayload(
        request_id=request.request_id,
        tenant_hash=tenant_hash(request.metadata.tenant),
        tier=tier,
        rule=rule,
        config_hash=config_hash,
        model=model,
        kind="output",
        text=text,
        redactions=dict(counts),
    )
