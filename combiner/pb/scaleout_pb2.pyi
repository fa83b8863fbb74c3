import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf import wrappers_pb2 as _wrappers_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LogLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NONE: _ClassVar[LogLevel]
    INFO: _ClassVar[LogLevel]
    DEBUG: _ClassVar[LogLevel]
    WARNING: _ClassVar[LogLevel]
    ERROR: _ClassVar[LogLevel]
    AUDIT: _ClassVar[LogLevel]

class ModelStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNKNOWN: _ClassVar[ModelStatus]
    IN_PROGRESS: _ClassVar[ModelStatus]
    OK: _ClassVar[ModelStatus]
    FAILED: _ClassVar[ModelStatus]
NONE: LogLevel
INFO: LogLevel
DEBUG: LogLevel
WARNING: LogLevel
ERROR: LogLevel
AUDIT: LogLevel
UNKNOWN: ModelStatus
IN_PROGRESS: ModelStatus
OK: ModelStatus
FAILED: ModelStatus

class Response(_message.Message):
    __slots__ = ("response", "parameters")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    response: str
    parameters: str
    def __init__(self, response: _Optional[str] = ..., parameters: _Optional[str] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("client_id", "status", "log_level", "timestamp", "type")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LOG_LEVEL_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    status: str
    log_level: LogLevel
    timestamp: _timestamp_pb2.Timestamp
    type: str
    def __init__(self, client_id: _Optional[str] = ..., status: _Optional[str] = ..., log_level: _Optional[_Union[LogLevel, str]] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., type: _Optional[str] = ...) -> None: ...

class ModelUpdate(_message.Message):
    __slots__ = ("client_id", "model_id", "model_update_id", "correlation_id", "timestamp", "meta", "config", "round_id", "session_id")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    model_id: str
    model_update_id: str
    correlation_id: str
    timestamp: _timestamp_pb2.Timestamp
    meta: str
    config: str
    round_id: str
    session_id: str
    def __init__(self, client_id: _Optional[str] = ..., model_id: _Optional[str] = ..., model_update_id: _Optional[str] = ..., correlation_id: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., meta: _Optional[str] = ..., config: _Optional[str] = ..., round_id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class ModelValidation(_message.Message):
    __slots__ = ("client_id", "model_id", "data", "correlation_id", "timestamp", "session_id")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    model_id: str
    data: str
    correlation_id: str
    timestamp: _timestamp_pb2.Timestamp
    session_id: str
    def __init__(self, client_id: _Optional[str] = ..., model_id: _Optional[str] = ..., data: _Optional[str] = ..., correlation_id: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., session_id: _Optional[str] = ...) -> None: ...

class ModelPrediction(_message.Message):
    __slots__ = ("client_id", "model_id", "data", "correlation_id", "timestamp", "session_id")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    model_id: str
    data: str
    correlation_id: str
    timestamp: _timestamp_pb2.Timestamp
    session_id: str
    def __init__(self, client_id: _Optional[str] = ..., model_id: _Optional[str] = ..., data: _Optional[str] = ..., correlation_id: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., session_id: _Optional[str] = ...) -> None: ...

class ModelMetric(_message.Message):
    __slots__ = ("client_id", "metrics", "timestamp", "step", "model_id", "round_id", "session_id")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    metrics: _containers.RepeatedCompositeFieldContainer[MetricElem]
    timestamp: _timestamp_pb2.Timestamp
    step: _wrappers_pb2.UInt32Value
    model_id: str
    round_id: str
    session_id: str
    def __init__(self, client_id: _Optional[str] = ..., metrics: _Optional[_Iterable[_Union[MetricElem, _Mapping]]] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., step: _Optional[_Union[_wrappers_pb2.UInt32Value, _Mapping]] = ..., model_id: _Optional[str] = ..., round_id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class MetricElem(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: float
    def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class AttributeMessage(_message.Message):
    __slots__ = ("client_id", "attributes", "timestamp")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    attributes: _containers.RepeatedCompositeFieldContainer[AttributeElem]
    timestamp: _timestamp_pb2.Timestamp
    def __init__(self, client_id: _Optional[str] = ..., attributes: _Optional[_Iterable[_Union[AttributeElem, _Mapping]]] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class AttributeElem(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: str
    def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class TelemetryMessage(_message.Message):
    __slots__ = ("client_id", "telemetries", "timestamp")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TELEMETRIES_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    telemetries: _containers.RepeatedCompositeFieldContainer[TelemetryElem]
    timestamp: _timestamp_pb2.Timestamp
    def __init__(self, client_id: _Optional[str] = ..., telemetries: _Optional[_Iterable[_Union[TelemetryElem, _Mapping]]] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class TelemetryElem(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: float
    def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("model_id", "data", "correlation_id", "timestamp", "session_id", "round_id", "type", "status", "client_id")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    data: str
    correlation_id: str
    timestamp: str
    session_id: str
    round_id: str
    type: str
    status: str
    client_id: str
    def __init__(self, model_id: _Optional[str] = ..., data: _Optional[str] = ..., correlation_id: _Optional[str] = ..., timestamp: _Optional[str] = ..., session_id: _Optional[str] = ..., round_id: _Optional[str] = ..., type: _Optional[str] = ..., status: _Optional[str] = ..., client_id: _Optional[str] = ...) -> None: ...

class ActivityReport(_message.Message):
    __slots__ = ("node_id", "correlation_id", "status", "done", "response")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    correlation_id: str
    status: str
    done: bool
    response: str
    def __init__(self, node_id: _Optional[str] = ..., correlation_id: _Optional[str] = ..., status: _Optional[str] = ..., done: bool = ..., response: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("client_id", "memory_utilisation", "cpu_utilisation")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_UTILISATION_FIELD_NUMBER: _ClassVar[int]
    CPU_UTILISATION_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    memory_utilisation: float
    cpu_utilisation: float
    def __init__(self, client_id: _Optional[str] = ..., memory_utilisation: _Optional[float] = ..., cpu_utilisation: _Optional[float] = ...) -> None: ...

class ClientAvailableMessage(_message.Message):
    __slots__ = ("client_id", "data", "timestamp")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    data: str
    timestamp: str
    def __init__(self, client_id: _Optional[str] = ..., data: _Optional[str] = ..., timestamp: _Optional[str] = ...) -> None: ...

class ClientAnnounceRequest(_message.Message):
    __slots__ = ("client_id", "type", "parameters")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    type: str
    parameters: str
    def __init__(self, client_id: _Optional[str] = ..., type: _Optional[str] = ..., parameters: _Optional[str] = ...) -> None: ...

class ModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ModelResponse(_message.Message):
    __slots__ = ("status", "message")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    status: ModelStatus
    message: str
    def __init__(self, status: _Optional[_Union[ModelStatus, str]] = ..., message: _Optional[str] = ...) -> None: ...
