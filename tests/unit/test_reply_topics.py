"""Reply topic generations: which topic a request names, and when a slot may be taken again."""

from __future__ import annotations

from services.router.replies import SLOTS, ReplyTopics


def test_without_generations_one_topic_serves_for_ever() -> None:
    topics = ReplyTopics("sb.replies.r1")
    for _ in range(10_000):
        assert topics.take() == "sb.replies.r1"
    assert not topics.full()
    assert topics.live() == topics.slots() == ["sb.replies.r1"]


def test_generations_take_turns_on_the_slots() -> None:
    topics = ReplyTopics("sb.replies.r1", generation_size=2)
    seen = []
    for _ in range(2 * SLOTS):
        for _ in range(2):
            topics.release(topics.take())
        assert topics.full() and topics.next_free()
        seen.append(topics.current)
        topics.rotate()
    assert seen == [f"sb.replies.r1.s{g % SLOTS}" for g in range(2 * SLOTS)]
    assert topics.slots() == [f"sb.replies.r1.s{g}" for g in range(SLOTS)]


def test_a_slot_is_not_taken_while_a_caller_waits_on_its_last_generation() -> None:
    topics = ReplyTopics("sb.replies.r1", generation_size=1)
    slow = topics.take()  # generation 0: this caller waits a long time
    for _ in range(SLOTS - 1):
        assert topics.next_free()
        topics.rotate()
        topics.release(topics.take())
    assert topics.full()
    assert not topics.next_free()  # the next generation's slot is generation 0's
    assert slow in topics.live()
    topics.release(slow)
    assert topics.next_free()
    assert topics.rotate() == slow  # emptied and taken again


def test_release_counts_against_the_newest_generation_on_that_topic() -> None:
    topics = ReplyTopics("sb.replies.r1", generation_size=1)
    topics.take()
    topics.rotate()
    assert topics.waiting == {0: 1, 1: 0}
    topics.release("sb.replies.r1.s0")
    assert topics.waiting == {0: 0, 1: 0}
    topics.release("sb.replies.r1.s0")  # a second release changes nothing
    assert topics.waiting == {0: 0, 1: 0}


def test_a_generation_is_full_after_as_many_records_as_requests() -> None:
    # a streamed answer is many records: the generation fills by what arrives on it, so the
    # broker's partitions stay as short as they do for whole answers
    topics = ReplyTopics("replies.r1", generation_size=10)
    first = topics.take()
    for _ in range(9):
        topics.read(first)
    topics.read("replies.r1.s2")  # another generation's record does not count
    assert not topics.full()
    topics.read(first)
    assert topics.full()
    topics.release(first)
    assert topics.next_free()
    topics.rotate()
    assert not topics.full() and topics.received == 0
