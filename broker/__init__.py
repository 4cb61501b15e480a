"""Herald brokers: the contract (:mod:`broker.base`) and its implementations."""

from broker.base import (
    Broker,
    BrokerMisconfigured,
    BrokerUnavailable,
    Event,
    EventSink,
    History,
    IdempotencyConflict,
    Message,
    Reset,
    ResetReason,
    RetentionPolicy,
)
from broker.memory import MemoryBroker

__all__ = [
    "Broker",
    "BrokerMisconfigured",
    "BrokerUnavailable",
    "Event",
    "EventSink",
    "History",
    "IdempotencyConflict",
    "MemoryBroker",
    "Message",
    "Reset",
    "ResetReason",
    "RetentionPolicy",
]
