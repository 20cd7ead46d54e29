"""What the simulator answers when a request offers tools or asks for JSON.

A real model decides whether to call a tool; the simulator follows a fixed rule so tests know what
comes back: offered tools (``tool_choice`` not ``none``) and no ``tool`` message after the last
user message yet, it calls one (the one ``tool_choice`` names, else the first). Otherwise it
answers text, which is JSON when ``response_format`` asks for it: an instance of the given JSON
Schema (``json_schema``), or an object holding the words (``json_object``). Arguments and JSON
answers are built from the schema by ``example_of``, so they validate against it; a *poor* JSON
answer (``poor_json_text``, see ``quality.py``) is built not to.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_MAX_DEPTH = 8  # a recursive schema ($ref to itself) stops here with its smallest value


@dataclass(frozen=True)
class ToolCallAnswer:
    id: str
    name: str
    arguments: str  # JSON text

    def as_message_call(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def tool_call(
    tools: Sequence[Mapping[str, Any]] | None,
    choice: Any,
    messages: Sequence[Mapping[str, Any]],
    words: Sequence[str],
) -> ToolCallAnswer | None:
    """The tool call this request gets, or None for a text answer."""
    functions = [t.get("function") or {} for t in tools or () if t.get("type") == "function"]
    if not functions or choice == "none" or _answered_since_last_user(messages):
        return None
    wanted = choice.get("function", {}).get("name") if isinstance(choice, Mapping) else None
    function = next((f for f in functions if f.get("name") == wanted), functions[0])
    arguments = example_of(function.get("parameters") or {"type": "object"}, words)
    return ToolCallAnswer(
        f"call_sim_{uuid.uuid4().hex[:20]}",
        str(function.get("name", "")),
        json.dumps(arguments, ensure_ascii=False),
    )


def _answered_since_last_user(messages: Sequence[Mapping[str, Any]]) -> bool:
    for message in reversed(messages):
        if message.get("role") == "tool":
            return True
        if message.get("role") == "user":
            return False
    return False


def json_text(response_format: Any, words: Sequence[str]) -> str | None:
    """The JSON answer ``response_format`` asks for, or None for plain text."""
    if not isinstance(response_format, Mapping):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return json.dumps({"answer": " ".join(words)}, ensure_ascii=False)
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") or {"type": "object"}
        return json.dumps(example_of(schema, words), ensure_ascii=False)
    return None


def poor_json_text(response_format: Any, words: Sequence[str], opener: str) -> str | None:
    """A poor answer to ``response_format`` (None for plain text): JSON that fails the schema
    (``json_schema``: a required property missing, an extra one where none are allowed, or a
    value of the wrong type) or, when no instance can fail the schema (``json_object``, or a
    schema that accepts anything), text that is not JSON: the opener, then JSON cut short."""
    good = json_text(response_format, words)
    if good is None:
        return None
    spec = response_format.get("json_schema") or {}
    schema = spec.get("schema") if response_format.get("type") == "json_schema" else None
    if schema:  # an empty or missing schema accepts any JSON
        invalid = _Builder(schema, list(words) or ["simulated"]).invalid(schema, opener)
        if invalid is not _NOTHING:
            return json.dumps(invalid, ensure_ascii=False)
    return f"{opener} {good[: max(len(good) // 2, 1)]}"


_NOTHING = object()  # no instance of the schema can be made invalid in one of the three ways


def example_of(schema: Mapping[str, Any], words: Sequence[str]) -> Any:
    """A value that validates against ``schema`` (the subset of JSON Schema that OpenAI's
    structured outputs and pydantic produce: types, properties, items, enum, const, anyOf,
    oneOf, allOf, $ref into $defs/definitions, string formats and numeric bounds)."""
    return _Builder(schema, list(words) or ["simulated"]).value(schema, 0)


class _Builder:
    def __init__(self, root: Mapping[str, Any], words: list[str]) -> None:
        self.root, self.words, self.next_word = root, words, 0

    def word(self) -> str:
        word = self.words[self.next_word % len(self.words)]
        self.next_word += 1
        return word

    def resolve(self, ref: str) -> Mapping[str, Any]:
        node: Any = self.root
        for part in ref.removeprefix("#/").split("/") if ref != "#" else []:
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node if isinstance(node, Mapping) else {}

    def invalid(self, schema: Mapping[str, Any], opener: str) -> Any:
        """An instance the top of ``schema`` refuses, or ``_NOTHING``."""
        for _ in range(_MAX_DEPTH):  # bounded: a $ref may point to itself
            if "$ref" in schema:
                schema = self.resolve(schema["$ref"])
        kind = schema.get("type")
        kinds = set(kind) if isinstance(kind, list) else {kind} if kind else set()
        if "object" in kinds or (not kinds and "properties" in schema):
            value = self.value(schema, 0)
            if isinstance(value, dict):
                required = [name for name in schema.get("required") or () if name in value]
                if required:
                    del value[required[0]]
                    return value
                if schema.get("additionalProperties") is False:
                    return {**value, "uncertain": opener}
        if kinds and "string" not in kinds:
            return opener  # a string where the schema wants another type
        if kinds == {"string"}:
            return 0
        return _NOTHING

    def value(self, schema: Mapping[str, Any] | bool, depth: int) -> Any:
        if not isinstance(schema, Mapping):
            return None if schema is False else {}
        if "$ref" in schema:
            return self.value(self.resolve(schema["$ref"]), depth + 1)
        if "const" in schema:
            return schema["const"]
        if schema.get("enum"):
            return schema["enum"][0]
        for key in ("anyOf", "oneOf"):
            if schema.get(key):
                options = schema[key]
                pick = next((o for o in options if o.get("type") != "null"), options[0])
                return self.value(pick, depth + 1)
        if schema.get("allOf"):
            merged: dict[str, Any] = {}
            for part in schema["allOf"]:
                part = self.resolve(part["$ref"]) if "$ref" in part else part
                merged = {**merged, **part}
            return self.value(merged, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind is None:
            kind = "object" if "properties" in schema else "string"
        return getattr(self, f"_{kind}", self._string)(schema, depth)

    def _object(self, schema: Mapping[str, Any], depth: int) -> dict[str, Any]:
        properties: Mapping[str, Any] = schema.get("properties") or {}
        required = set(schema.get("required") or ())
        if depth >= _MAX_DEPTH:
            properties = {k: v for k, v in properties.items() if k in required}
        return {name: self.value(sub, depth + 1) for name, sub in properties.items()}

    def _array(self, schema: Mapping[str, Any], depth: int) -> list[Any]:
        count = max(int(schema.get("minItems", 0)), 0 if depth >= _MAX_DEPTH else 1)
        if "maxItems" in schema:
            count = min(count, int(schema["maxItems"]))
        prefix = schema.get("prefixItems") or []
        items = schema.get("items", {})
        return [
            self.value(prefix[i] if i < len(prefix) else items, depth + 1)
            for i in range(max(count, len(prefix)))
        ]

    def _string(self, schema: Mapping[str, Any], _depth: int) -> str:
        fmt = schema.get("format")
        if fmt == "date-time":
            return "2026-01-01T00:00:00Z"
        if fmt == "date":
            return "2026-01-01"
        if fmt == "time":
            return "00:00:00"
        if fmt == "email":
            return "simulated@example.com"
        if fmt == "uuid":
            return "00000000-0000-4000-8000-000000000000"
        if fmt in ("uri", "url"):
            return "https://example.com/simulated"
        text = self.word()
        low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
        while len(text) < low:
            text += " " + self.word()
        return text if high is None else text[: int(high)]

    def _integer(self, schema: Mapping[str, Any], _depth: int) -> int:
        low = schema.get("minimum")
        if "exclusiveMinimum" in schema:
            low = int(schema["exclusiveMinimum"]) + 1
        high = schema.get("maximum")
        if "exclusiveMaximum" in schema:
            high = int(schema["exclusiveMaximum"]) - 1
        value = int(low) if low is not None else 0 if high is None or high >= 0 else int(high)
        multiple = schema.get("multipleOf")
        if multiple and value % int(multiple):
            value += int(multiple) - value % int(multiple)
        return value

    def _number(self, schema: Mapping[str, Any], depth: int) -> float:
        if "exclusiveMinimum" in schema and "minimum" not in schema:
            high = schema.get("maximum", schema.get("exclusiveMaximum"))
            low = float(schema["exclusiveMinimum"])
            return (low + float(high)) / 2 if high is not None else low + 1.0
        return float(self._integer(schema, depth))

    def _boolean(self, _schema: Mapping[str, Any], _depth: int) -> bool:
        return True

    def _null(self, _schema: Mapping[str, Any], _depth: int) -> None:
        return None
