"""PII and secrets out of captured text (services/common/redact.py): each kind planted in text
comes out replaced and counted; what only looks alike stays."""

from __future__ import annotations

import pytest

from services.common.redact import redact

PLANTED = [
    ("mail me at jane.doe+tickets@example.co.uk today", "email", "jane.doe+tickets@example.co.uk"),
    ("call (415) 555-2671 after 5", "phone", "555-2671"),
    ("or +44 20 7946 0958 in London", "phone", "7946 0958"),
    ("card 4111 1111 1111 1111 exp 12/29", "card", "4111 1111 1111 1111"),
    ("card 5500-0000-0000-0004 please", "card", "5500-0000-0000-0004"),
    ("from 192.168.10.24 at noon", "ip", "192.168.10.24"),
    ("v6 2001:db8::8a2e:370:7334 too", "ip", "2001:db8::8a2e:370:7334"),
    (
        "key sk-proj-abcdefghijklmnopqrstuv123 leaked",
        "api_key",
        "sk-proj-abcdefghijklmnopqrstuv123",
    ),
    ("aws AKIAIOSFODNN7EXAMPLE here", "api_key", "AKIAIOSFODNN7EXAMPLE"),
    ('{"api_key": "zq8x7c6v5b4n3m2l"}', "api_key", "zq8x7c6v5b4n3m2l"),
    ("ghp_abcdefghijklmnopqrstuvwxyz0123456789 token", "api_key", "ghp_abcdefghij"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.abc.def", "bearer", "eyJhbGciOiJIUzI1NiJ9"),
    ("use bearer abcdefgh12345678 for it", "bearer", "abcdefgh12345678"),
]


@pytest.mark.parametrize(("text", "kind", "secret"), PLANTED)
def test_each_kind_is_replaced_and_counted(text: str, kind: str, secret: str) -> None:
    out, counts = redact(text)
    assert secret not in out
    assert f"[{kind.upper()}]" in out
    assert counts[kind] == 1, counts


@pytest.mark.parametrize(
    "text",
    [
        "order 1234567890123 shipped",  # 13 digits, not a Luhn number
        "version 1.2.3.4567 of the app",  # not an address
        "the meeting is at 10:30 on 12/05",
        "see ticket ABC-12345 and sk-short",
        "an email-like thing@localhost",
        "price 4,111.11 dollars",
    ],
)
def test_what_only_looks_alike_stays(text: str) -> None:
    out, counts = redact(text)
    assert out == text and not counts


def test_many_kinds_in_one_text() -> None:
    text = " ".join(t for t, _, _ in PLANTED)
    out, counts = redact(text)
    assert all(secret not in out for _, _, secret in PLANTED)
    assert sum(counts.values()) == len(PLANTED)
