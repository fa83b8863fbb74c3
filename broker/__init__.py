"""Everything that knows Redis. Nothing outside this package issues a Redis command."""

from broker.broker import Broker, connect
from broker.context import Settings
from broker.errors import BrokerError, BrokerUnavailable, Conflict, InvalidInput, NotFound, NotReady

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerUnavailable",
    "Conflict",
    "InvalidInput",
    "NotFound",
    "NotReady",
    "Settings",
    "connect",
]
