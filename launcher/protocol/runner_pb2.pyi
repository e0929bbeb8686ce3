from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FailureReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAILURE_REASON_UNSPECIFIED: _ClassVar[FailureReason]
    FAILURE_REASON_SQL: _ClassVar[FailureReason]
    FAILURE_REASON_TIMEOUT: _ClassVar[FailureReason]
    FAILURE_REASON_MEMORY: _ClassVar[FailureReason]
    FAILURE_REASON_RESULT_LIMIT: _ClassVar[FailureReason]
    FAILURE_REASON_CANCELLED: _ClassVar[FailureReason]
    FAILURE_REASON_DENIED: _ClassVar[FailureReason]
    FAILURE_REASON_INTERNAL: _ClassVar[FailureReason]
FAILURE_REASON_UNSPECIFIED: FailureReason
FAILURE_REASON_SQL: FailureReason
FAILURE_REASON_TIMEOUT: FailureReason
FAILURE_REASON_MEMORY: FailureReason
FAILURE_REASON_RESULT_LIMIT: FailureReason
FAILURE_REASON_CANCELLED: FailureReason
FAILURE_REASON_DENIED: FailureReason
FAILURE_REASON_INTERNAL: FailureReason

class ReadyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReadyReply(_message.Message):
    __slots__ = ("runner_version", "duckdb_version", "warmup_ipc", "startup_seconds")
    RUNNER_VERSION_FIELD_NUMBER: _ClassVar[int]
    DUCKDB_VERSION_FIELD_NUMBER: _ClassVar[int]
    WARMUP_IPC_FIELD_NUMBER: _ClassVar[int]
    STARTUP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    runner_version: str
    duckdb_version: str
    warmup_ipc: bytes
    startup_seconds: float
    def __init__(self, runner_version: _Optional[str] = ..., duckdb_version: _Optional[str] = ..., warmup_ipc: _Optional[bytes] = ..., startup_seconds: _Optional[float] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("query_id", "sql", "timeout_seconds", "max_rows", "max_bytes", "batch_rows", "tables", "parameters", "output_path")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    SQL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    sql: str
    timeout_seconds: float
    max_rows: int
    max_bytes: int
    batch_rows: int
    tables: _containers.RepeatedCompositeFieldContainer[TableBinding]
    parameters: bytes
    output_path: str
    def __init__(self, query_id: _Optional[str] = ..., sql: _Optional[str] = ..., timeout_seconds: _Optional[float] = ..., max_rows: _Optional[int] = ..., max_bytes: _Optional[int] = ..., batch_rows: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[TableBinding, _Mapping]]] = ..., parameters: _Optional[bytes] = ..., output_path: _Optional[str] = ...) -> None: ...

class TableBinding(_message.Message):
    __slots__ = ("name", "format", "paths")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    name: str
    format: str
    paths: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., format: _Optional[str] = ..., paths: _Optional[_Iterable[str]] = ...) -> None: ...

class ExecuteChunk(_message.Message):
    __slots__ = ("ipc", "summary", "failure", "output")
    IPC_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ipc: bytes
    summary: Summary
    failure: Failure
    output: bytes
    def __init__(self, ipc: _Optional[bytes] = ..., summary: _Optional[_Union[Summary, _Mapping]] = ..., failure: _Optional[_Union[Failure, _Mapping]] = ..., output: _Optional[bytes] = ...) -> None: ...

class Summary(_message.Message):
    __slots__ = ("rows", "ipc_bytes", "execute_seconds", "statement_type")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    IPC_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXECUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STATEMENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    rows: int
    ipc_bytes: int
    execute_seconds: float
    statement_type: str
    def __init__(self, rows: _Optional[int] = ..., ipc_bytes: _Optional[int] = ..., execute_seconds: _Optional[float] = ..., statement_type: _Optional[str] = ...) -> None: ...

class Failure(_message.Message):
    __slots__ = ("reason", "message")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    reason: FailureReason
    message: str
    def __init__(self, reason: _Optional[_Union[FailureReason, str]] = ..., message: _Optional[str] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("query_id",)
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    def __init__(self, query_id: _Optional[str] = ...) -> None: ...

class CancelReply(_message.Message):
    __slots__ = ("interrupted",)
    INTERRUPTED_FIELD_NUMBER: _ClassVar[int]
    interrupted: bool
    def __init__(self, interrupted: _Optional[bool] = ...) -> None: ...
