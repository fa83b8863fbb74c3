"""Broker errors. The gRPC layer maps each to a status the 1.0.0 client survives."""


class BrokerError(Exception):
    """Base class for errors the broker raises on purpose."""


class BrokerUnavailable(BrokerError):
    """Redis did not answer after the bounded retries: the caller should try again later."""


class InvalidInput(BrokerError):
    """The request can never succeed as sent (bad id, bad size, ...)."""


class NotFound(BrokerError):
    """The named thing does not exist."""


class NotReady(BrokerError):
    """The named thing exists but is not usable yet (e.g. a model still uploading)."""


class Conflict(BrokerError):
    """The request contradicts what is stored (e.g. a different model under the same id)."""


class TooLarge(BrokerError):
    """The payload exceeds a configured limit."""


class Forbidden(BrokerError):
    """The caller may not act on the named thing (another client's task or model)."""


class SchemaMismatch(BrokerError):
    """The keys under the prefix were written by another schema version (broker/schema.py):
    this code would misread them, so it refuses to run against them."""


class Misconfigured(BrokerError):
    """The settings cannot work with this Redis (a Sentinel URL with ``--redis-cluster``,
    several hosts for a Redis that is no Cluster): the process refuses to start."""
