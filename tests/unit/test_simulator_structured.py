"""The simulator's tool calls and JSON answers: when it calls a tool, and that what it writes
validates against the schema it was given (pydantic's schemas, $defs and all)."""

from __future__ import annotations

import json
from datetime import date, datetime
from enum import StrEnum
from typing import Any, Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from services.simulator.structured import example_of, json_text, poor_json_text, tool_call

WORDS = ["Simulated", "answer", "from", "sim-light"]


class Queue(StrEnum):
    billing = "billing"
    refunds = "refunds"


class Customer(BaseModel):
    name: str = Field(min_length=12)
    email: str = Field(json_schema_extra={"format": "email"})
    since: date


class Ticket(BaseModel):
    queue: Queue
    priority: int = Field(ge=1, le=5)
    score: float = Field(gt=0, lt=1)
    tags: list[Literal["vip", "churn-risk"]] = Field(min_length=2)
    customer: Customer
    previous: list[Customer] | None = None
    opened: datetime
    note: str | None = Field(default=None, max_length=3)
    escalate: bool


class Tree(BaseModel):  # recursive: $ref to itself
    label: str
    children: list[Tree] = []


@pytest.mark.parametrize("model", [Ticket, Customer, Tree])
def test_an_example_of_a_pydantic_schema_validates_as_that_model(model: type[BaseModel]) -> None:
    schema = model.model_json_schema()
    value = example_of(schema, WORDS)
    jsonschema.validate(value, schema)
    model.model_validate(value)


def test_an_example_holds_every_property_and_the_bounds() -> None:
    value = example_of(Ticket.model_json_schema(), WORDS)
    assert set(value) == set(Ticket.model_fields)
    assert value["priority"] == 1 and 0 < value["score"] < 1 and len(value["tags"]) >= 2
    assert len(value["customer"]["name"]) >= 12


TOOLS = [
    {"type": "function", "function": {"name": "first", "parameters": {"type": "object"}}},
    {
        "type": "function",
        "function": {
            "name": "second",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
]
USER = [{"role": "user", "content": "weather?"}]


@pytest.mark.parametrize(
    ("choice", "messages", "called"),
    [
        (None, USER, "first"),  # offered tools: the first is called
        ("auto", USER, "first"),
        ("required", USER, "first"),
        ({"type": "function", "function": {"name": "second"}}, USER, "second"),
        ("none", USER, None),  # told not to
        # the tool answered after the last user message: now text
        (
            None,
            [
                *USER,
                {"role": "assistant", "tool_calls": [{"id": "c"}]},
                {"role": "tool", "tool_call_id": "c", "content": "sunny"},
            ],
            None,
        ),
    ],
)
def test_when_a_tool_is_called(choice: Any, messages: list[Any], called: str | None) -> None:
    call = tool_call(TOOLS, choice, messages, WORDS)
    assert (call.name if call else None) == called
    if call is not None:
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == called)
        jsonschema.validate(json.loads(call.arguments), schema)
        assert call.id.startswith("call_sim_")


def test_no_tools_no_call() -> None:
    assert tool_call(None, None, USER, WORDS) is None
    assert tool_call([], "auto", USER, WORDS) is None


def test_json_text_for_each_response_format() -> None:
    assert json_text(None, WORDS) is None
    assert json_text({"type": "text"}, WORDS) is None
    assert json.loads(json_text({"type": "json_object"}, WORDS) or "") == {
        "answer": " ".join(WORDS)
    }
    spec = {"name": "t", "schema": Customer.model_json_schema(), "strict": True}
    Customer.model_validate_json(json_text({"type": "json_schema", "json_schema": spec}, WORDS))


OPENER = "I'm not sure, but"


def _refused(text: str, schema: dict[str, Any]) -> bool:
    """True if ``text`` is not JSON, or JSON that ``schema`` refuses."""
    try:
        value = json.loads(text)
    except ValueError:
        return True
    return not jsonschema.Draft202012Validator(schema).is_valid(value)


@pytest.mark.parametrize(
    "schema",
    [
        Ticket.model_json_schema(),  # required properties: one is left out
        Customer.model_json_schema(),
        Tree.model_json_schema(),
        {"$ref": "#/$defs/C", "$defs": {"C": Customer.model_json_schema()}},
        {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": False},
        {"type": "object"},  # no required property: a value of another type
        {"type": "array", "items": {"type": "integer"}},
        {"type": "string"},
        {"type": "integer", "minimum": 3},
        {"type": ["object", "string"]},  # anything of two types: text that is not JSON
        {},
    ],
)
def test_a_poor_json_schema_answer_fails_the_schema_a_good_one_passes(
    schema: dict[str, Any],
) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}
    good = json_text(response_format, WORDS)
    assert good is not None and not _refused(good, schema)
    poor = poor_json_text(response_format, WORDS, OPENER)
    assert poor is not None and _refused(poor, schema)


def test_a_required_property_is_what_a_poor_object_answer_lacks() -> None:
    spec = {"name": "t", "schema": Customer.model_json_schema()}
    poor = json.loads(
        poor_json_text({"type": "json_schema", "json_schema": spec}, WORDS, OPENER) or ""
    )
    assert set(poor) == set(Customer.model_fields) - {"name"}


def test_a_poor_json_object_answer_is_not_json() -> None:
    poor = poor_json_text({"type": "json_object"}, WORDS, OPENER) or ""
    assert poor.startswith(OPENER)
    with pytest.raises(ValueError):
        json.loads(poor)
    assert poor_json_text(None, WORDS, OPENER) is None
    assert poor_json_text({"type": "text"}, WORDS, OPENER) is None
