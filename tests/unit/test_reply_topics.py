"""Reply topic generations: which topic a request names, and when a generation may go."""

from __future__ import annotations

import pytest

from services.router.replies import ReplyTopics


def test_without_generations_one_topic_serves_for_ever() -> None:
    topics = ReplyTopics("sb.replies.r1")
    for _ in range(10_000):
        assert topics.take() == "sb.replies.r1"
    assert not topics.full()
    assert topics.live() == ["sb.replies.r1"]
    assert topics.generation_of("sb.replies.r1") == 0
    assert topics.generation_of("sb.replies.r1.g0") is None


def test_a_generation_is_full_after_its_size_and_the_next_one_is_named() -> None:
    topics = ReplyTopics("sb.replies.r1", generation_size=3)
    assert [topics.take() for _ in range(3)] == ["sb.replies.r1.g0"] * 3
    assert topics.full()
    assert topics.rotate() == "sb.replies.r1.g1"
    assert not topics.full()
    assert topics.take() == "sb.replies.r1.g1"


def test_an_old_generation_goes_only_when_no_caller_waits_on_it() -> None:
    topics = ReplyTopics("sb.replies.r1", generation_size=2)
    first, second = topics.take(), topics.take()
    topics.rotate()
    assert topics.idle_old() == []  # two callers still wait on g0
    topics.release(first)
    assert topics.idle_old() == []
    topics.release(second)
    assert topics.idle_old() == ["sb.replies.r1.g0"]
    topics.forget("sb.replies.r1.g0")
    assert topics.live() == ["sb.replies.r1.g1"]
    topics.release(first)  # a late release of a forgotten generation changes nothing
    assert topics.live() == ["sb.replies.r1.g1"]


def test_the_current_generation_is_never_idle_old_nor_forgotten() -> None:
    topics = ReplyTopics("sb.replies.r1", generation_size=1)
    topics.take()
    topics.rotate()
    topics.forget(topics.current)
    assert topics.current in topics.live()
    assert topics.current not in topics.idle_old()


@pytest.mark.parametrize(
    ("existing", "stray"),
    [
        (
            {"sb.replies.r1.g0", "sb.replies.r1.g1", "sb.replies.r1.g5"},
            ["sb.replies.r1.g0", "sb.replies.r1.g1"],
        ),
        ({"sb.replies.r10.g0", "sb.replies.r1x.g0", "other"}, []),  # other routers, other topics
        ({"sb.replies.r1.g2", "sb.replies.r1.g3"}, []),  # live ones
    ],
)
def test_deleted_generations_that_came_back_are_found(existing: set[str], stray: list[str]) -> None:
    topics = ReplyTopics("sb.replies.r1", generation_size=1)
    for generation in range(3):
        taken = topics.take()
        if generation < 2:  # a caller still waits on g2
            topics.release(taken)
        topics.rotate()
    for topic in topics.idle_old():
        topics.forget(topic)
    assert topics.live() == ["sb.replies.r1.g2", "sb.replies.r1.g3"]
    assert topics.stray(existing) == stray
