"""The batch publisher's key partitioning agrees with Kafka's default partitioner (aiokafka's, which
the one-at-a-time publisher uses), key for key."""

from __future__ import annotations

import random

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as reference_murmur2

from services.common.kafka import partition_for_key, partitions_for_keys

_RNG = random.Random(20)
KEYS = [_RNG.randbytes(n) for n in range(0, 70) for _ in range(20)] + [
    b"",
    b"sbr-0123456789abcdef0123456789abcdef",
    "tenant-é".encode(),
]


@pytest.mark.parametrize("partitions", [1, 2, 4, 7, 64])
def test_batch_partitioning_matches_one_at_a_time(partitions: int) -> None:
    expected = [(reference_murmur2(k) & 0x7FFFFFFF) % partitions for k in KEYS]
    assert partitions_for_keys(KEYS, partitions) == expected
    assert [partition_for_key(k, partitions) for k in KEYS] == expected
    same_length = [k for k in KEYS if len(k) == 37]  # the numpy path (many keys of one length)
    assert partitions_for_keys(same_length, partitions) == [
        (reference_murmur2(k) & 0x7FFFFFFF) % partitions for k in same_length
    ]


def test_a_key_goes_where_the_default_partitioner_puts_it() -> None:
    parts = [0, 1, 2, 3]
    for key in KEYS:
        assert partition_for_key(key, 4) == DefaultPartitioner()(key, parts, parts)
