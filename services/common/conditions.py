"""The rule condition language: a small, safe expression language (never ``eval``).

Grammar::

    expr    := and ('or' and)*
    and     := unary ('and' unary)*
    unary   := 'not' unary | compare
    compare := operand (('==' | '!=' | '<' | '<=' | '>' | '>=' | 'matches' | 'in') operand)?
    operand := NUMBER | STRING | 'true' | 'false' | 'null' | list | 'len' '(' field ')'
             | field | '(' expr ')'
    list    := '[' (literal (',' literal)*)? ']'
    field   := NAME ('.' NAME)?

Fields are the request features in ``FIELDS`` (plus ``tags.<key>``). A condition is compiled once,
at config load: unknown fields, bad regexes and type mismatches fail then, not per request.
Comparisons against an absent value (``task`` not given) are false.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

FIELDS: dict[str, type] = {
    "prompt": str,  # every message's text, joined
    "last_user": str,  # text of the last user message
    "system": str,  # text of the system/developer messages
    "prompt_chars": int,
    "prompt_tokens": int,  # estimate: ceil(chars / 4)
    "message_count": int,
    "image_count": int,
    "has_images": bool,
    "has_tools": bool,  # tools offered and tool_choice not "none"
    "wants_json": bool,  # response_format json_object or json_schema
    "requires_reasoning": bool,
    "priority": int,
    "task": str,
    "tenant": str,
    "model": str,
    "max_tokens": int,
}
TAG_PREFIX = "tags."

Features = Mapping[str, Any]
Predicate = Callable[[Features], Any]


class ConditionError(ValueError):
    """A condition that does not parse or does not type-check; ``position`` is a 0-based column."""

    def __init__(self, message: str, position: int | None = None) -> None:
        self.position = position
        where = f" (at column {position + 1})" if position is not None else ""
        super().__init__(f"{message}{where}")


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<number>\d+(?:\.\d+)?)
      | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<op>==|!=|<=|>=|<|>|\(|\)|\[|\]|,)
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_-]*)?)
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "matches", "in", "true", "false", "null", "len"}
_COMPARE = {"==", "!=", "<", "<=", ">", ">=", "matches", "in"}


@dataclass(frozen=True)
class _Tok:
    kind: str  # number | string | op | name | kw | end
    value: Any
    pos: int


def _unescape(raw: str) -> str:
    body = raw[1:-1]
    return re.sub(r"\\(.)", r"\1", body)


def _tokenize(text: str) -> list[_Tok]:
    tokens: list[_Tok] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            start = len(text) - len(text[pos:].lstrip())
            raise ConditionError(f"unexpected character {text[start]!r}", start)
        start = m.start(m.lastgroup or 0)
        kind = m.lastgroup or ""
        raw = m.group(kind)
        if kind == "number":
            tokens.append(_Tok("number", float(raw) if "." in raw else int(raw), start))
        elif kind == "string":
            tokens.append(_Tok("string", _unescape(raw), start))
        elif kind == "name" and raw in _KEYWORDS:
            tokens.append(_Tok("kw", raw, start))
        else:
            tokens.append(_Tok(kind, raw, start))
        pos = m.end()
    tokens.append(_Tok("end", None, len(text)))
    return tokens


@dataclass(frozen=True)
class _Node:
    """A compiled operand: its evaluator and its static type (``None`` = the null literal)."""

    fn: Predicate
    typ: type | None
    pos: int
    literal: bool = False


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.i = 0

    def peek(self) -> _Tok:
        return self.tokens[self.i]

    def at_keyword(self, word: str) -> bool:
        tok = self.tokens[self.i]
        return tok.kind == "kw" and tok.value == word

    def take(self) -> _Tok:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def expect(self, kind: str, value: str | None = None) -> _Tok:
        tok = self.take()
        if tok.kind != kind or (value is not None and tok.value != value):
            want = value or kind
            got = tok.value if tok.kind != "end" else "end of condition"
            raise ConditionError(f"expected {want!r}, found {got!r}", tok.pos)
        return tok

    def parse(self) -> _Node:
        node = self.parse_or()
        tok = self.peek()
        if tok.kind != "end":
            raise ConditionError(f"unexpected {tok.value!r}", tok.pos)
        return node

    def parse_or(self) -> _Node:
        node = self.parse_and()
        while self.at_keyword("or"):
            self.take()
            left, right = node, self.parse_and()
            node = _Node(_either(left.fn, right.fn), bool, left.pos)
        return node

    def parse_and(self) -> _Node:
        node = self.parse_unary()
        while self.at_keyword("and"):
            self.take()
            left, right = node, self.parse_unary()
            node = _Node(_both(left.fn, right.fn), bool, left.pos)
        return node

    def parse_unary(self) -> _Node:
        tok = self.peek()
        if tok.kind == "kw" and tok.value == "not":
            self.take()
            inner = self.parse_unary()
            return _Node(_negate(inner.fn), bool, tok.pos)
        return self.parse_compare()

    def parse_compare(self) -> _Node:
        left = self.parse_operand()
        tok = self.peek()
        op = tok.value if tok.kind in ("op", "kw") and tok.value in _COMPARE else None
        if op is None:
            return left
        self.take()
        right = self.parse_operand()
        return _compare(op, left, right, tok.pos)

    def parse_operand(self) -> _Node:
        tok = self.take()
        if tok.kind == "number":
            return _const(tok.value, type(tok.value), tok.pos)
        if tok.kind == "string":
            return _const(tok.value, str, tok.pos)
        if tok.kind == "kw" and tok.value in ("true", "false"):
            return _const(tok.value == "true", bool, tok.pos)
        if tok.kind == "kw" and tok.value == "null":
            return _const(None, None, tok.pos)
        if tok.kind == "kw" and tok.value == "len":
            self.expect("op", "(")
            field = self.expect("name")
            self.expect("op", ")")
            inner = _field(field.value, field.pos)
            if inner.typ is not str:
                raise ConditionError(f"len() takes a text field, not {field.value!r}", field.pos)
            return _Node(_length(inner.fn), int, tok.pos)
        if tok.kind == "name":
            return _field(tok.value, tok.pos)
        if tok.kind == "op" and tok.value == "(":
            node = self.parse_or()
            self.expect("op", ")")
            return node
        if tok.kind == "op" and tok.value == "[":
            return self.parse_list(tok)
        got = tok.value if tok.kind != "end" else "end of condition"
        raise ConditionError(f"expected a value or field, found {got!r}", tok.pos)

    def parse_list(self, open_tok: _Tok) -> _Node:
        items: list[Any] = []
        if self.peek().kind == "op" and self.peek().value == "]":
            self.take()
        else:
            while True:
                tok = self.take()
                if tok.kind not in ("number", "string"):
                    raise ConditionError("lists hold only numbers and strings", tok.pos)
                items.append(tok.value)
                sep = self.take()
                if sep.kind == "op" and sep.value == "]":
                    break
                if not (sep.kind == "op" and sep.value == ","):
                    raise ConditionError("expected ',' or ']' in list", sep.pos)
        frozen = tuple(items)
        return _Node(lambda f: frozen, tuple, open_tok.pos, literal=True)


def _either(a: Predicate, b: Predicate) -> Predicate:
    return lambda f: bool(a(f)) or bool(b(f))


def _both(a: Predicate, b: Predicate) -> Predicate:
    return lambda f: bool(a(f)) and bool(b(f))


def _negate(a: Predicate) -> Predicate:
    return lambda f: not a(f)


def _length(a: Predicate) -> Predicate:
    return lambda f: len(a(f) or "")


def _const(value: Any, typ: type | None, pos: int) -> _Node:
    return _Node(lambda f: value, typ, pos, literal=True)


def _field(name: str, pos: int) -> _Node:
    if name.startswith(TAG_PREFIX):
        return _Node(partial(_lookup, name), str, pos)
    if name not in FIELDS:
        known = ", ".join(sorted(FIELDS))
        raise ConditionError(f"unknown field {name!r}; known fields: {known}, tags.<key>", pos)
    return _Node(partial(_lookup, name), FIELDS[name], pos)


def _lookup(name: str, features: Features) -> Any:
    return features.get(name)


_NUMERIC = (int, float)


def _comparable(a: type | None, b: type | None) -> bool:
    if a is None or b is None:
        return True
    if a is bool or b is bool:
        return a is b
    return (a in _NUMERIC and b in _NUMERIC) or a is b


def _compare(op: str, left: _Node, right: _Node, pos: int) -> _Node:
    lf, rf = left.fn, right.fn
    if op == "matches":
        if left.typ is not str or not (right.literal and right.typ is str):
            raise ConditionError("'matches' needs a text field on the left and a regex string", pos)
        try:
            pattern = re.compile(right.fn({}))
        except re.error as exc:
            raise ConditionError(f"bad regex {right.fn({})!r}: {exc}", right.pos) from exc
        return _Node(
            lambda f: (v := lf(f)) is not None and pattern.search(v) is not None, bool, pos
        )
    if op == "in":
        if right.typ is not tuple:
            raise ConditionError('\'in\' needs a list on the right, e.g. task in ["a", "b"]', pos)
        return _Node(lambda f: (v := lf(f)) is not None and v in rf(f), bool, pos)
    if not _comparable(left.typ, right.typ):
        raise ConditionError(
            f"cannot compare {_type_name(left.typ)} with {_type_name(right.typ)} using {op!r}", pos
        )
    if op in ("==", "!="):
        negate = op == "!="
        return _Node(lambda f: (lf(f) == rf(f)) != negate, bool, pos)
    if left.typ is bool or right.typ is bool:
        raise ConditionError(f"{op!r} does not apply to true/false values", pos)
    compare = {
        "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b,
        ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b,
    }[op]

    def ordered(f: Features) -> bool:
        a, b = lf(f), rf(f)
        return a is not None and b is not None and compare(a, b)

    return _Node(ordered, bool, pos)


def _type_name(typ: type | None) -> str:
    if typ is None:
        return "null"
    return "a list" if typ is tuple else typ.__name__


@dataclass(frozen=True)
class Condition:
    """A compiled condition; call ``matches(features)``."""

    source: str
    _fn: Predicate

    def matches(self, features: Features) -> bool:
        return bool(self._fn(features))


def compile_condition(source: str) -> Condition:
    if not source.strip():
        raise ConditionError("empty condition")
    node = _Parser(source).parse()
    return Condition(source, node.fn)
