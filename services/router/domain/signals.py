"""Cheap signals about what a request asks for, for rules to read (``has_code``, ``has_math``,
``reasoning_markers``, ``multi_step``, ``complexity``, ``user_turns``).

Each is a handful of compiled regular expressions over the last user message: no model, no
network, no tokenizer. They answer "does this look like code, maths or a chain of reasoning?",
which is what sends a three-line maths problem past the fast tier when the caller declared
nothing. They are heuristics: English markers, and notation any language shares. A rule that
reads none of them costs nothing (``classify.Features`` computes a field on first read).
"""

from __future__ import annotations

import re

# Code: fenced blocks, source lines, or a request to write, fix or explain code.
_CODE = re.compile(
    r"```"
    r"|^\s*(?:def|class|import|from\s+\S+\s+import|function|const|let|var|public|private"
    r"|#include|package|fn|func)\b"
    r"|\b(?:SELECT\b[^;]{0,200}?\bFROM|INSERT\s+INTO|CREATE\s+TABLE)\b"
    r"|[A-Za-z_][A-Za-z0-9_]*\([^()\n]*\)\s*(?:\{|=>|:\s*$)"
    r"|\b(?:write|implement|code|debug|refactor|fix)\s+(?:a|an|the|this|my)?\s*"
    r"(?:python|javascript|typescript|java|rust|go|c\+\+|sql|bash|shell)?\s*"
    r"(?:function|program|script|class|method|query|regex|algorithm|bug|code|snippet)\b"
    r"|\b(?:python|javascript|typescript|golang|rust|c\+\+|java|sql|regex)\b"
    r"|\b(?:stack\s*trace|traceback|segfault|compile[sr]?|runtime error|unit tests?)\b",
    re.IGNORECASE | re.MULTILINE,
)

# Maths: an equation or inequality over a variable, LaTeX, maths symbols, or maths vocabulary.
_MATH = re.compile(
    r"\d\s*[a-z]\b\s*[-+*/^=<>]"  # 3x + 7, 2y = 10
    r"|\b[a-z]\s*(?:\^|\*\*)\s*\d"  # x^2
    r"|\b[a-z]\s*[-+]\s*\d+\s*[=<>]"  # x + 7 = 22
    r"|\\(?:frac|sqrt|sum|int|lim|prod|cdot|leq|geq|neq|pi)\b"
    r"|[∑∫√≤≥≠π∞∂±÷\u00d7]"  # \u00d7: the multiplication sign
    r"|\b(?:solve|equation|integral|derivative|differentiate|integrate|probability"
    r"|prime numbers?|factori[sz]e|polynomial|theorem|matrix|eigen\w*|logarithm|modulo|percentage of)\b",
    re.IGNORECASE,
)

# Reasoning: words that ask for an argument rather than a lookup. Each distinct one counts once.
_REASONING = re.compile(
    r"\b(?:why|explain|prove|proof|justify|deduce|infer|derive|therefore|hence|implies|must"
    r"|consequently|compare|contrast|trade-?offs?|analy[sz]e|evaluate|reason(?:ing)?|logic(?:al)?"
    r"|puzzle|paradox|counterexample|assume|suppose|whether|if\s+all|some\s+\w+\s+are"
    r"|all\s+\w+\s+are|necessarily|step[- ]by[- ]step)\b",
    re.IGNORECASE,
)

# Multi-step: an explicit sequence, or a request for one.
_STEPS = re.compile(
    r"\bstep[- ]by[- ]step\b|\beach step\b|\bsteps?\b.{0,200}?\b(?:then|next|finally)\b"
    r"|\bfirst\b[\s\S]{0,500}?\bthen\b|\band then\b|\bfinally\b",
    re.IGNORECASE,
)
_NUMBERED = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+\S", re.MULTILINE)

# Signals read a long message's first and last ``EDGE_CHARS`` characters: the instruction
# usually sits before or after a pasted document, and a 20,000-character scan cost 8.6 ms.
EDGE_CHARS = 2_000
LONG_WORDS = 300  # a message this long (in words) counts towards ``complexity``
LONG_TURNS = 6  # and so does a conversation with more user turns than this


def scanned(text: str) -> str:
    """The part of a message the signals read: all of it, or its two ends."""
    if len(text) <= 2 * EDGE_CHARS:
        return text
    return f"{text[:EDGE_CHARS]}\n{text[-EDGE_CHARS:]}"


def has_code(text: str) -> bool:
    """Code, or a request about code."""
    return _CODE.search(text) is not None


def has_math(text: str) -> bool:
    """Maths notation or vocabulary."""
    return _MATH.search(text) is not None


def reasoning_markers(text: str) -> int:
    """How many distinct reasoning markers ``text`` holds."""
    return len({m.lower() for m in _REASONING.findall(text)})


def multi_step(text: str) -> bool:
    """An explicit sequence of steps, or a request for one, or a list of two items or more."""
    return _STEPS.search(text) is not None or len(_NUMBERED.findall(text)) >= 2


def complexity(code: bool, math: bool, steps: bool, markers: int, words: int, turns: int) -> int:
    """0 to 10: how hard the last user message looks. Code, maths and a sequence of steps add 2
    each; each reasoning marker adds 1 (at most 3); a long message (over ``LONG_WORDS`` words)
    and a long conversation (over ``LONG_TURNS`` user turns) add 1 each."""
    score = 2 * (int(code) + int(math) + int(steps)) + min(markers, 3)
    score += int(words > LONG_WORDS) + int(turns > LONG_TURNS)
    return min(score, 10)
