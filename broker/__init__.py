"""Everything that knows Redis. Nothing outside this package issues a Redis command."""

from broker.broker import Broker, connect
from broker.context import Settings
from broker.errors import (
    BrokerError,
    BrokerUnavailable,
    Conflict,
    InvalidInput,
    Misconfigured,
    NotFound,
    NotReady,
    SchemaMismatch,
)
from broker.partitions import DEFAULT_CLUSTER, MAX_PARTITIONS

__all__ = [
    "DEFAULT_CLUSTER",
    "MAX_PARTITIONS",
    "Broker",
    "BrokerError",
    "BrokerUnavailable",
    "Conflict",
    "InvalidInput",
    "Misconfigured",
    "NotFound",
    "NotReady",
    "SchemaMismatch",
    "Settings",
    "connect",
]
