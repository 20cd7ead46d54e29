"""Our key partitioning agrees with Kafka's default partitioner (aiokafka's), key for key."""

from __future__ import annotations

import random

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as reference_murmur2

from services.common.kafka import KeyPartitioner, murmur2, partition_for_key, partitions_for_keys

_RNG = random.Random(20)
KEYS = [_RNG.randbytes(n) for n in range(0, 70) for _ in range(20)] + [
    b"",
    b"sbr-0123456789abcdef0123456789abcdef",
    "tenant-é".encode(),
]


def test_murmur2_is_kafkas() -> None:
    for key in KEYS:
        assert murmur2(key) & 0x7FFFFFFF == reference_murmur2(key) & 0x7FFFFFFF, key


@pytest.mark.parametrize("partitions", [1, 2, 4, 7, 64])
def test_batch_partitioning_matches_one_at_a_time(partitions: int) -> None:
    expected = [(reference_murmur2(k) & 0x7FFFFFFF) % partitions for k in KEYS]
    assert partitions_for_keys(KEYS, partitions) == expected
    assert [partition_for_key(k, partitions) for k in KEYS] == expected
    same_length = [k for k in KEYS if len(k) == 37]  # the numpy path (many keys of one length)
    assert partitions_for_keys(same_length, partitions) == [
        (reference_murmur2(k) & 0x7FFFFFFF) % partitions for k in same_length
    ]


def test_key_partitioner_places_keys_as_the_default_one_and_spreads_the_rest() -> None:
    ours, theirs = KeyPartitioner(), DefaultPartitioner()
    parts = [0, 1, 2, 3]
    for key in KEYS:
        assert ours(key, parts, parts) == theirs(key, parts, parts)
    assert {ours(None, parts, parts) for _ in range(8)} == set(parts)
    assert ours(None, parts, [2]) == 2  # only available partitions take keyless messages
