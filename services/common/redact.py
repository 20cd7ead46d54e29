"""PII and secrets out of captured text, before it leaves the process. Pure.

What is replaced, in this order (a later kind never sees what an earlier one replaced):

=========  ================================================================  ==============
kind       found by                                                          replaced with
=========  ================================================================  ==============
bearer     ``Bearer <token>`` and ``Authorization: <scheme> <value>``         ``[BEARER]``
api_key    known key shapes (OpenAI/Anthropic ``sk-``, AWS ``AKIA``, GitHub  ``[API_KEY]``
           ``ghp_``/``github_pat_``, Slack ``xox?-``, Google ``AIza``, Stripe
           ``sk_live_``/``rk_``) and ``api_key=…`` / ``"apiKey": "…"`` pairs
email      an address with a dotted domain                                   ``[EMAIL]``
card       13 to 19 digits (spaces or dashes between) passing the Luhn check  ``[CARD]``
ip         IPv4 and IPv6 addresses that ``ipaddress`` accepts                ``[IP]``
phone      ``phonenumbers`` (Google's libphonenumber): numbers valid in       ``[PHONE]``
           ``PHONE_REGION`` or written internationally (``+44 …``)
=========  ================================================================  ==============

Phone numbers are the one kind with a maintained library that fits (rules per country, which
a regex gets wrong both ways); the rest are shapes a regex states exactly, checked further
where a check exists (Luhn for cards, ``ipaddress`` for addresses). Presidio was considered:
its recognisers need a spaCy language model (hundreds of MB, fetched from the internet), for
names and places, which are not on the list.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable

import phonenumbers

PHONE_REGION = "US"  # numbers without a country code are read as this region's

_BEARER = re.compile(
    r"(?i)\b(?:authorization\s*[:=]\s*[\"']?(?:bearer|basic|token)?\s*|bearer\s+)"
    r"[A-Za-z0-9._~+/=-]{8,}"
)
_API_KEY = re.compile(
    r"\b(?:sk-(?:ant-|proj-)?[A-Za-z0-9_-]{16,}|sk_live_[A-Za-z0-9]{16,}|rk_live_[A-Za-z0-9]{16,}"
    r"|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{40,}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35})"
    r"|(?i:\b(?:api[_-]?key|secret[_-]?key|access[_-]?token)[\"']?\s*[:=]\s*[\"']?)"
    r"[A-Za-z0-9._~+/=-]{8,}"
)
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = int(ch)
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def _is_card(match: str) -> bool:
    digits = re.sub(r"[ -]", "", match)
    return 13 <= len(digits) <= 19 and _luhn(digits)


def _is_ip(match: str) -> bool:
    try:
        ipaddress.ip_address(match)
    except ValueError:
        return False
    return True


_RULES: list[tuple[str, re.Pattern[str], Callable[[str], bool] | None]] = [
    ("bearer", _BEARER, None),
    ("api_key", _API_KEY, None),
    ("email", _EMAIL, None),
    ("card", _CARD, _is_card),
    ("ip", _IPV4, _is_ip),
    ("ip", _IPV6, _is_ip),
]


def _phones(text: str, counts: Counter[str]) -> str:
    out, last = [], 0
    for match in phonenumbers.PhoneNumberMatcher(text, PHONE_REGION):
        out.append(text[last : match.start])
        out.append("[PHONE]")
        last = match.end
        counts["phone"] += 1
    out.append(text[last:])
    return "".join(out)


def redact(text: str, counts: Counter[str] | None = None) -> tuple[str, Counter[str]]:
    """``text`` with every kind above replaced, and how many of each were."""
    counts = Counter() if counts is None else counts
    for kind, pattern, check in _RULES:

        def replace(
            m: re.Match[str], kind: str = kind, check: Callable[[str], bool] | None = check
        ) -> str:
            if check is not None and not check(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return f"[{kind.upper()}]"

        text = pattern.sub(replace, text)
    return _phones(text, counts), counts
