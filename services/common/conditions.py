"""The rule condition language: a small, safe expression language (never ``eval``).

Grammar::

    expr    := and ('or' and)*
    and     := unary ('and' unary)*
    unary   := 'not' unary | compare
    compare := sum (('==' | '!=' | '<' | '<=' | '>' | '>=' | 'matches' | 'in') sum)?
    sum     := term (('+' | '-') term)*
    term    := factor (('*' | '/') factor)*
    factor  := '-' factor | operand
    operand := NUMBER | STRING | 'true' | 'false' | 'null' | list | 'len' '(' field ')'
             | field | '(' expr ')'
    list    := '[' (item (',' item)*)? ']'
    item    := '-'? NUMBER | STRING
    field   := NAME ('.' NAME)?  |  'tags.' KEY        (KEY may also hold '-')

``compile_condition(source, fields, tags)`` takes the fields a condition may read: by default the
request features in ``FIELDS`` plus ``tags.<key>`` (rules); the canary figures pass their own set,
whose names may be dotted (``baseline.error_rate``) and are looked up whole. A condition is
compiled once, at config load: unknown fields, bad regexes and type mismatches fail then, not per
request.

Arithmetic (``+ - * /``, unary ``-``) takes numbers only: int if both sides are int and the
operator is not ``/``, else float. Only a ``tags.`` name may hold ``-`` (``tags.cost-centre``), so
``baseline.error_rate-0.01`` is a subtraction; tags are text and never take part in arithmetic,
but write ``tags.x - 1`` with spaces if you mean the minus.

Absent values: ``<``, ``<=``, ``>``, ``>=``, ``matches`` and ``in`` against an absent value
(``task`` not given) are false; ``== null`` tests for absence, so ``task != "x"`` holds when
``task`` is absent. Arithmetic with an absent value, or a division by zero, gives no value, and
every comparison with such a value, ``==`` and ``!=`` included, is false.
"""

from __future__ import annotations

import operator
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
    "prompt_tokens": int,  # litellm's default tokenizer (services/common/tokens.py)
    "fits_context": bool,  # prompt_tokens within every model's context window
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
    # cheap signals over the last user message (services/router/domain/signals.py)
    "has_code": bool,  # code, or a request to write, fix or explain code
    "has_math": bool,  # maths notation or vocabulary
    "reasoning_markers": int,  # distinct words that ask for an argument: why, prove, must...
    "multi_step": bool,  # a sequence of steps, or a request for one
    "complexity": int,  # 0-10, from the signals above, length and turns
    "user_turns": int,  # user messages in the conversation
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


# A '-' inside a name is allowed only in a tag key; anywhere else it is the minus operator.
_NAME = r"tags\.[A-Za-z_][A-Za-z0-9_-]*|[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?"
_TOKEN = re.compile(
    rf"""\s*(?:
        (?P<number>\d+(?:\.\d+)?)
      | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<op>==|!=|<=|>=|<|>|\(|\)|\[|\]|,|\+|-|\*|/)
      | (?P<name>{_NAME})
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
    """A compiled operand: its evaluator and its static type (``None`` = the null literal).

    ``computed`` marks arithmetic, whose value is missing when an input is absent or a divisor is
    zero; comparisons with such a value are all false."""

    fn: Predicate
    typ: type | None
    pos: int
    literal: bool = False
    computed: bool = False
    field: str | None = None  # the field this operand reads, when it is one


class _Parser:
    def __init__(self, text: str, fields: Mapping[str, type], tags: bool) -> None:
        self.tokens = _tokenize(text)
        self.i = 0
        self.fields = fields
        self.tags = tags

    def peek(self) -> _Tok:
        return self.tokens[self.i]

    def at_keyword(self, word: str) -> bool:
        tok = self.tokens[self.i]
        return tok.kind == "kw" and tok.value == word

    def at_op(self, *ops: str) -> bool:
        tok = self.tokens[self.i]
        return tok.kind == "op" and tok.value in ops

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
        left = self.parse_sum()
        tok = self.peek()
        op = tok.value if tok.kind in ("op", "kw") and tok.value in _COMPARE else None
        if op is None:
            return left
        self.take()
        right = self.parse_sum()
        return _compare(op, left, right, tok.pos)

    def parse_sum(self) -> _Node:
        node = self.parse_term()
        while self.at_op("+", "-"):
            tok = self.take()
            node = _arithmetic(tok.value, node, self.parse_term())
        return node

    def parse_term(self) -> _Node:
        node = self.parse_factor()
        while self.at_op("*", "/"):
            tok = self.take()
            node = _arithmetic(tok.value, node, self.parse_factor())
        return node

    def parse_factor(self) -> _Node:
        if self.at_op("-"):
            tok = self.take()
            return _minus(self.parse_factor(), tok.pos)
        return self.parse_operand()

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
            inner = self.field(field.value, field.pos)
            if inner.typ is not str:
                raise ConditionError(f"len() takes a text field, not {field.value!r}", field.pos)
            return _Node(_length(inner.fn), int, tok.pos)
        if tok.kind == "name":
            return self.field(tok.value, tok.pos)
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
        if self.at_op("]"):
            self.take()
        else:
            while True:
                items.append(self.parse_list_item())
                sep = self.take()
                if sep.kind == "op" and sep.value == "]":
                    break
                if not (sep.kind == "op" and sep.value == ","):
                    raise ConditionError("expected ',' or ']' in list", sep.pos)
        frozen = tuple(items)
        return _Node(lambda f: frozen, tuple, open_tok.pos, literal=True)

    def parse_list_item(self) -> Any:
        sign = -1 if self.at_op("-") else 1
        if sign < 0:
            self.take()
        tok = self.take()
        if tok.kind == "number":
            return sign * tok.value
        if tok.kind == "string" and sign > 0:
            return tok.value
        raise ConditionError("lists hold only numbers and strings", tok.pos)

    def field(self, name: str, pos: int) -> _Node:
        if name in self.fields:
            return _Node(partial(_lookup, name), self.fields[name], pos, field=name)
        if self.tags and name.startswith(TAG_PREFIX):
            return _Node(partial(_lookup, name), str, pos)
        known = sorted(self.fields) + (["tags.<key>"] if self.tags else [])
        listed = ", ".join(known) or "none"
        raise ConditionError(f"unknown field {name!r}; known fields: {listed}", pos)


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


def _lookup(name: str, features: Features) -> Any:
    return features.get(name)


_NUMERIC = (int, float)


def _divide(a: Any, b: Any) -> Any:
    return None if b == 0 else a / b


_ARITHMETIC: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": _divide,
}


def _apply(op: Callable[[Any, Any], Any], lf: Predicate, rf: Predicate) -> Predicate:
    def run(f: Features) -> Any:
        a, b = lf(f), rf(f)
        return None if a is None or b is None else op(a, b)

    return run


def _arithmetic(op: str, left: _Node, right: _Node) -> _Node:
    for side in (left, right):
        if side.typ not in _NUMERIC:
            raise ConditionError(f"{op!r} needs numbers, not {_type_name(side.typ)}", side.pos)
    if op == "/" and right.literal and right.fn({}) == 0:
        raise ConditionError("division by zero", right.pos)
    typ = int if op != "/" and left.typ is int and right.typ is int else float
    fn = _apply(_ARITHMETIC[op], left.fn, right.fn)
    if left.literal and right.literal:
        return _const(fn({}), typ, left.pos)
    return _Node(fn, typ, left.pos, computed=True)


def _minus(inner: _Node, pos: int) -> _Node:
    if inner.typ not in _NUMERIC:
        raise ConditionError(f"'-' needs a number, not {_type_name(inner.typ)}", inner.pos)
    if inner.literal:
        return _const(-inner.fn({}), inner.typ, pos)
    fn = inner.fn
    return _Node(lambda f: None if (v := fn(f)) is None else -v, inner.typ, pos, computed=True)


def _comparable(a: type | None, b: type | None) -> bool:
    if a is None or b is None:
        return True
    if a is bool or b is bool:
        return a is b
    return (a in _NUMERIC and b in _NUMERIC) or a is b


def _compare(op: str, left: _Node, right: _Node, pos: int) -> _Node:
    if op == "matches":
        return _matches(left, right, pos)
    lf, rf = left.fn, right.fn
    if op == "in":
        if right.typ is not tuple:
            raise ConditionError('\'in\' needs a list on the right, e.g. task in ["a", "b"]', pos)
        return _Node(lambda f: (v := lf(f)) is not None and v in rf(f), bool, pos)
    if not _comparable(left.typ, right.typ):
        raise ConditionError(
            f"cannot compare {_type_name(left.typ)} with {_type_name(right.typ)} using {op!r}", pos
        )
    if op in ("==", "!="):
        return _equal(op, left, right, pos)
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

    if left.field in BOUNDED and right.literal:
        return _Node(_bounded(op, left.field, compare, ordered, rf), bool, pos)
    return _Node(ordered, bool, pos)


# Fields whose value may cost something to compute (prompt_tokens: a tokenizer pass) and which
# the features can bound from above for almost nothing (``upper_bound``): a comparison with a
# number that the bound decides never computes the value.
BOUNDED = frozenset({"prompt_tokens"})


def _bounded(
    op: str,
    name: str,
    compare: Callable[[Any, Any], bool],
    exact: Predicate,
    right: Predicate,
) -> Predicate:
    def run(f: Features) -> bool:
        upper = getattr(f, "upper_bound", None)
        hi, b = (upper(name) if upper else None), right(f)
        if hi is not None and b is not None:
            if op in ("<", "<=") and compare(hi, b):
                return True  # value <= hi < b (or <= b)
            if op in (">", ">=") and not compare(hi, b):
                return False  # value <= hi <= b (or < b)
        return bool(exact(f))

    return run


def _matches(left: _Node, right: _Node, pos: int) -> _Node:
    if left.typ is not str or not (right.literal and right.typ is str):
        raise ConditionError("'matches' needs a text field on the left and a regex string", pos)
    try:
        pattern = re.compile(right.fn({}))
    except re.error as exc:
        raise ConditionError(f"bad regex {right.fn({})!r}: {exc}", right.pos) from exc
    lf = left.fn
    return _Node(lambda f: (v := lf(f)) is not None and pattern.search(v) is not None, bool, pos)


def _equal(op: str, left: _Node, right: _Node, pos: int) -> _Node:
    lf, rf = left.fn, right.fn
    negate = op == "!="
    if not (left.computed or right.computed):
        # A plain field keeps the null semantics: absent == null, absent != "x".
        return _Node(lambda f: (lf(f) == rf(f)) != negate, bool, pos)
    if left.typ is None or right.typ is None:
        raise ConditionError(f"a computed value is never null, so {op!r} null is never true", pos)

    def strict(f: Features) -> bool:
        a, b = lf(f), rf(f)
        return a is not None and b is not None and (a == b) != negate

    return _Node(strict, bool, pos)


def _type_name(typ: type | None) -> str:
    if typ is None:
        return "null"
    return "a list" if typ is tuple else typ.__name__


def _check_fields(fields: Mapping[str, type]) -> None:
    """Refuse a field set with a name the tokenizer cannot produce: it could never be read."""
    for name in fields:
        if not re.fullmatch(_NAME, name) or name in _KEYWORDS:
            raise ValueError(f"field {name!r} cannot be written in a condition")


@dataclass(frozen=True)
class Condition:
    """A compiled condition; call ``matches(features)``."""

    source: str
    _fn: Predicate

    def matches(self, features: Features) -> bool:
        return bool(self._fn(features))


def compile_condition(
    source: str, fields: Mapping[str, type] = FIELDS, tags: bool = True
) -> Condition:
    """Compile ``source`` over ``fields`` (name → type); ``tags`` also allows ``tags.<key>``."""
    _check_fields(fields)
    if not source.strip():
        raise ConditionError("empty condition")
    node = _Parser(source, fields, tags).parse()
    return Condition(source, node.fn)
