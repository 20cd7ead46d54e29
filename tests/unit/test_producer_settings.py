"""Which brokers get idempotent producers."""

from __future__ import annotations

from services.common.settings import CommonSettings


def test_the_embedded_broker_gets_no_idempotent_producer() -> None:
    assert CommonSettings(kafka_idempotence=True).idempotent_producer
    assert not CommonSettings(kafka_idempotence=True, embedded_broker=True).idempotent_producer
    assert not CommonSettings(kafka_idempotence=False).idempotent_producer
