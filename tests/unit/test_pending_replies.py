"""Callers waiting on the router for an answer, alone or sharing an idempotency key."""

from __future__ import annotations

import asyncio

import pytest

from schemas.v1 import ChatError
from services.router.service import KeyReused, PendingReplies


def answer(request_id: str) -> ChatError:
    return ChatError(request_id=request_id, code="invalid_request", message="m")


async def test_a_joined_caller_gets_the_answer_after_the_first_caller_left() -> None:
    replies = PendingReplies()
    first, created = replies.expect("r1", "fp")
    joined, created_again = replies.expect("r1", "fp")
    assert created and not created_again and joined is first
    replies.leave("r1", first)  # the first caller disconnects
    assert replies.resolve(answer("r1"))
    assert (await asyncio.wait_for(joined, 1)).request_id == "r1"
    replies.leave("r1", joined)
    assert len(replies) == 0


async def test_the_last_caller_to_leave_removes_the_wait() -> None:
    replies = PendingReplies()
    future, _ = replies.expect("r2")
    replies.expect("r2")
    replies.leave("r2", future)
    assert len(replies) == 1
    replies.leave("r2", future)
    assert len(replies) == 0
    assert not replies.resolve(answer("r2"))  # a late answer nobody waits for


async def test_a_key_sent_again_with_other_content_while_waiting_is_refused() -> None:
    replies = PendingReplies()
    replies.expect("r3", "fp-a")
    with pytest.raises(KeyReused):
        replies.expect("r3", "fp-b")


async def test_callers_who_joined_a_request_that_was_never_sent_are_told() -> None:
    replies = PendingReplies()
    future, _ = replies.expect("r4")
    joined, _ = replies.expect("r4")
    replies.fail("r4", future, RuntimeError("not sent"))
    with pytest.raises(RuntimeError, match="not sent"):
        await asyncio.wait_for(joined, 1)
    assert len(replies) == 0
