"""The Redis key schema, in one place.

Every key starts with a configurable prefix (default ``so``). Client-supplied strings
(client ids, correlation ids, model ids) are percent-encoded before they go into a key:
everything outside ``[A-Za-z0-9._~-]`` becomes ``%XX`` of its UTF-8 bytes, so an id with
``{ } : * %``, spaces, newlines or unicode can neither collide with another id nor escape
its namespace, and no id can open or close a hash tag.

Keys that many clients share are split into N partitions (broker/partitions.py): a
client's own keys and its partition's shared keys carry the partition's hash tag ``{T}``, so
every script touches one Redis Cluster slot. N is 1 on a standalone Redis or Sentinel, and
fixed per prefix when it is first used (``P:partitions``). A model's keys share the tag
``{M}`` (its id), an upload's ``{U}``. Keys without a tag are read or written one at a time.

=================================  ======  ===========================================
key                                type    holds
=================================  ======  ===========================================
P:{T}:c:C:client                   hash    id, name, status, last_seen, current, replica
P:{T}:c:C:queue                    list    correlation ids of queued tasks (FIFO:
                                           LPUSH in, RPOP out)
P:{T}:c:C:task:X                   hash    one task: type, model_id, data, session_id,
                                           round_id, state, flag, report, result ...
P:{T}:c:C:streamed                 set     tasks C's TaskStreams took and no result answered
                                           yet (put back when C opens a new stream)
P:{T}:c:C:models                   set     model ids of C's tasks: the models C may download
                                           (expires with the task TTL, renewed per push)
P:{T}:c:C:rec:KIND                 list    the client's latest records (capped)
P:{T}:taskref:X                    string  client id owning task X (lookup by id alone)
P:{T}:clients                      zset    client id -> last seen (unix seconds)
P:{T}:streams                      zset    client id -> lease expiry of an open TaskStream
P:{T}:in:KIND                      stream  inbound messages (updates, validations, ...)
P:{T}:wake                         pubsub  wake-ups for TaskStreams: encoded client ids,
                                           one per line, whose queues got tasks (sharded
                                           pub/sub on a Cluster)
P:replicas                         zset    replica id -> lease expiry
P:replica:R                        hash    id, address, pid, started, streams, clients, seen
P:workers                          zset    worker id -> lease expiry
P:worker:W                         hash    id, pid, started, seen, roles (JSON: role -> health)
P:model:{M}                        hash    model meta: state, size, sha256, store, chunks,
                                           uploader (client id; '' for operators, workers)
P:model:{M}:chunks                 list    the model's bytes in <= 1 MiB chunks (redis store)
P:model:{M}:upload:U               list    chunks of an upload in progress (expires)
P:sessions                         zset    session id -> created (unix seconds)
P:session:S                        hash    session: status, config, current round,
                                           model_id, seed_model_id, error, driver
P:session:S:lease                  string  worker id driving S (expires unless renewed)
P:session:S:drivers                list    "worker time" each time a worker took S
P:session:S:round:R                hash    round: status, model_in, model_out, clients,
                                           deadline, updates, rejected, reason
P:session:S:round:R:tasks          hash    training correlation id -> client id
P:session:S:round:R:validations    hash    validation correlation id -> client id
P:session:S:rec:KIND               hash    stream entry id -> record (metrics, ...)
P:catalog:models                   zset    global model id -> committed (seeds, round models)
P:catalog:model:M                  hash    model_id, parent_model, session_id, round_id,
                                           name, committed_at (broker/catalog.py)
P:packages                         zset    compute package id -> committed
P:package:K                        hash    package_id, name, file_name, checksum, model_id
                                           (where its bytes are), helper, description,
                                           size, committed_at
P:packages:active                  string  the active package's id
P:file:{U}                         hash    an HTTP file upload: file_name, file_size,
                                           received, state (expires, broker/files.py)
P:file:{U}:chunks                  list    its chunks (expires)
P:session-names                    hash    session name -> session id
P:auth:token:I                     hash    refresh token I (first 16 hex of its SHA-256):
                                           hash, client_id, role, created, expires, status
P:auth:tokens                      zset    token id -> created (unix seconds)
P:auth:keys                        hash    signing key id -> its public key (PEM)
P:auth:revoked                     zset    revoked token id -> when to forget it
P:auth:revocations                 string  counter, bumped by every revocation
P:schema                           string  the schema version these keys were written by
                                           (broker/schema.py; set by the first connect)
P:partitions                       string  N, the number of partitions (set with P:schema)
=================================  ======  ===========================================
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

from broker.partitions import partition_of, tags

# Inbound stream kinds, one stream each (P:in:<kind>).
INBOUND_KINDS = (
    "updates",
    "validations",
    "predictions",
    "metrics",
    "statuses",
    "telemetry",
    "attributes",
    "reports",
    "presence",
)

_PREFIX_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")  # \Z: "$" would accept a trailing newline


def encode_id(value: str) -> str:
    """Percent-encode a client-supplied id so it is safe (and injective) inside a key."""
    return quote(value, safe="-._~")


def decode_id(value: str) -> str:
    return unquote(value)


class Keys:
    """Builds every key name from one prefix."""

    def __init__(self, prefix: str = "so", partitions: int = 1) -> None:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"key prefix must match {_PREFIX_RE.pattern}, got {prefix!r}")
        self.prefix = prefix
        self.use_partitions(partitions)

    def use_partitions(self, n: int) -> None:
        """Set N (Broker.start does, from what P:partitions holds)."""
        self._tags = tuple(f"{self.prefix}:{{{t}}}" for t in tags(n))
        self.partitions = n

    def partition_of(self, client_id: str) -> int:
        return partition_of(client_id, self.partitions)

    @property
    def all_partitions(self) -> range:
        return range(self.partitions)

    @property
    def partition_count(self) -> str:
        return f"{self.prefix}:partitions"

    @property
    def version_1_marker(self) -> str:
        """A key every used prefix of schema version 1 has (its global client index)."""
        return f"{self.prefix}:clients"

    @property
    def schema(self) -> str:
        """The schema version of every key under the prefix (broker/schema.py)."""
        return f"{self.prefix}:schema"

    # per client (in its partition's slot)
    def client_tag(self, client_id: str) -> str:
        return f"{self._tags[self.partition_of(client_id)]}:c:{encode_id(client_id)}"

    def client(self, client_id: str) -> str:
        return f"{self.client_tag(client_id)}:client"

    def queue(self, client_id: str) -> str:
        return f"{self.client_tag(client_id)}:queue"

    def streamed(self, client_id: str) -> str:
        """Encoded correlation ids handed to the client's TaskStreams (stream_take.lua)."""
        return f"{self.client_tag(client_id)}:streamed"

    def task(self, client_id: str, correlation_id: str) -> str:
        return f"{self.client_tag(client_id)}:task:{encode_id(correlation_id)}"

    def given_models(self, client_id: str) -> str:
        """Model ids of the client's tasks: what an authenticated client may download."""
        return f"{self.client_tag(client_id)}:models"

    def task_prefix(self, client_id: str) -> str:
        """What the poll script prepends to an (encoded) correlation id."""
        return f"{self.client_tag(client_id)}:task:"

    # per partition (p: 0..N-1; a client's is partition_of(client id))
    def taskref(self, correlation_id: str, p: int) -> str:
        return f"{self._tags[p]}:taskref:{encode_id(correlation_id)}"

    def clients(self, p: int = 0) -> str:
        return f"{self._tags[p]}:clients"

    def streams(self, p: int = 0) -> str:
        return f"{self._tags[p]}:streams"

    def inbound(self, kind: str, p: int = 0) -> str:
        if kind not in INBOUND_KINDS:
            raise ValueError(f"unknown inbound stream {kind!r}")
        return f"{self._tags[p]}:in:{kind}"

    def wake(self, p: int = 0) -> str:
        return f"{self._tags[p]}:wake"

    # global

    @property
    def replicas(self) -> str:
        return f"{self.prefix}:replicas"

    def replica(self, replica_id: str) -> str:
        return f"{self.prefix}:replica:{encode_id(replica_id)}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{encode_id(worker_id)}"

    def model(self, model_id: str) -> str:
        return f"{self.prefix}:model:{{{encode_id(model_id)}}}"

    def model_chunks(self, model_id: str) -> str:
        return f"{self.model(model_id)}:chunks"

    def model_upload(self, model_id: str, upload_id: str) -> str:
        return f"{self.model(model_id)}:upload:{upload_id}"

    # sessions and rounds
    @property
    def sessions(self) -> str:
        return f"{self.prefix}:sessions"

    def session(self, session_id: str) -> str:
        return f"{self.prefix}:session:{encode_id(session_id)}"

    def session_lease(self, session_id: str) -> str:
        return f"{self.session(session_id)}:lease"

    def session_drivers(self, session_id: str) -> str:
        return f"{self.session(session_id)}:drivers"

    def round(self, session_id: str, round_id: str) -> str:
        return f"{self.session(session_id)}:round:{encode_id(round_id)}"

    def round_tasks(self, session_id: str, round_id: str, kind: str = "tasks") -> str:
        if kind not in ("tasks", "validations"):
            raise ValueError(kind)
        return f"{self.round(session_id, round_id)}:{kind}"

    def session_records(self, session_id: str, kind: str) -> str:
        return f"{self.session(session_id)}:rec:{kind}"

    # the control plane's catalog (broker/catalog.py) and uploads (broker/files.py)
    @property
    def catalog_models(self) -> str:
        return f"{self.prefix}:catalog:models"

    def catalog_model(self, model_id: str) -> str:
        return f"{self.prefix}:catalog:model:{encode_id(model_id)}"

    @property
    def packages(self) -> str:
        return f"{self.prefix}:packages"

    def package(self, package_id: str) -> str:
        return f"{self.prefix}:package:{encode_id(package_id)}"

    @property
    def active_package(self) -> str:
        return f"{self.prefix}:packages:active"

    def file(self, upload_id: str) -> str:
        return f"{self.prefix}:file:{{{encode_id(upload_id)}}}"

    def file_chunks(self, upload_id: str) -> str:
        return f"{self.file(upload_id)}:chunks"

    @property
    def session_names(self) -> str:
        return f"{self.prefix}:session-names"

    # credentials (broker/credentials.py)
    def token(self, token_id: str) -> str:
        return f"{self.prefix}:auth:token:{encode_id(token_id)}"

    @property
    def tokens(self) -> str:
        return f"{self.prefix}:auth:tokens"

    @property
    def signing_keys(self) -> str:
        return f"{self.prefix}:auth:keys"

    @property
    def revoked(self) -> str:
        return f"{self.prefix}:auth:revoked"

    @property
    def revocations(self) -> str:
        return f"{self.prefix}:auth:revocations"

    def client_records(self, client_id: str, kind: str) -> str:
        return f"{self.client_tag(client_id)}:rec:{kind}"

    @staticmethod
    def woken_clients(message: bytes | str) -> list[str]:
        """The client ids a wake-up message names (push.lua joins them with newlines;
        encoded ids hold no newline)."""
        text = message.decode() if isinstance(message, bytes) else message
        return [decode_id(enc) for enc in text.split("\n") if enc]
