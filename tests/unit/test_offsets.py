from services.common.offsets import OffsetTracker


def test_commit_point_moves_only_over_a_contiguous_prefix() -> None:
    t = OffsetTracker()
    for off in (5, 6, 7, 8):
        t.started("p0", off)
    t.finished("p0", 7)
    t.finished("p0", 6)
    assert t.to_commit() == {"p0": 5}  # nothing before 5 is done: point stays at 5
    t.finished("p0", 5)
    assert t.to_commit() == {"p0": 8}
    t.committed({"p0": 8})
    assert t.to_commit() == {}
    t.finished("p0", 8)
    assert t.to_commit() == {"p0": 9}
    assert t.in_flight() == 0


def test_partitions_are_independent_and_forgettable() -> None:
    t = OffsetTracker()
    t.started("a", 0)
    t.started("b", 10)
    t.finished("b", 10)
    assert t.to_commit() == {"a": 0, "b": 11}
    t.forget("a")
    t.finished("a", 0)  # finished after revocation: ignored, the new owner redoes it
    assert "a" not in t.to_commit()
    assert t.in_flight("b") == 0


def test_offsets_the_partition_never_hands_out_do_not_freeze_the_point() -> None:
    # compaction, transaction markers or a reset leave gaps: 11 and 12 never arrive
    t = OffsetTracker()
    for off in (10, 13, 14):
        t.started("p", off)
    t.finished("p", 10)
    assert t.to_commit() == {"p": 13}
    t.finished("p", 14)
    assert t.to_commit() == {"p": 13}  # 13 is still in flight
    t.finished("p", 13)
    assert t.to_commit() == {"p": 15}


def test_a_record_read_again_from_further_back_holds_the_point() -> None:
    t = OffsetTracker()
    t.started("p", 5)
    t.finished("p", 5)
    t.started("p", 2)  # rewound
    assert t.to_commit() == {"p": 2}
    t.finished("p", 2)
    assert t.to_commit() == {"p": 6}
