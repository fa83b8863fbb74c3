"""Everything that knows Redis. Nothing outside this package issues a Redis command."""

from broker.broker import Broker, connect
from broker.context import Settings
from broker.errors import (
    BrokerError,
    BrokerUnavailable,
    Conflict,
    InvalidInput,
    NotFound,
    NotReady,
    SchemaMismatch,
)

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerUnavailable",
    "Conflict",
    "InvalidInput",
    "NotFound",
    "NotReady",
    "SchemaMismatch",
    "Settings",
    "connect",
]
