from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EnrollRequest(_message.Message):
    __slots__ = ("token", "csr_pem", "worker_name", "worker_version")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    WORKER_NAME_FIELD_NUMBER: _ClassVar[int]
    WORKER_VERSION_FIELD_NUMBER: _ClassVar[int]
    token: str
    csr_pem: bytes
    worker_name: str
    worker_version: str
    def __init__(self, token: _Optional[str] = ..., csr_pem: _Optional[bytes] = ..., worker_name: _Optional[str] = ..., worker_version: _Optional[str] = ...) -> None: ...

class EnrollReply(_message.Message):
    __slots__ = ("worker_id", "certificate_pem", "ca_pem", "control_plane_version", "tunnel_port")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    CONTROL_PLANE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TUNNEL_PORT_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    certificate_pem: bytes
    ca_pem: bytes
    control_plane_version: str
    tunnel_port: int
    def __init__(self, worker_id: _Optional[str] = ..., certificate_pem: _Optional[bytes] = ..., ca_pem: _Optional[bytes] = ..., control_plane_version: _Optional[str] = ..., tunnel_port: _Optional[int] = ...) -> None: ...

class WorkerMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "draining", "session_opened", "session_ended", "result")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    SESSION_OPENED_FIELD_NUMBER: _ClassVar[int]
    SESSION_ENDED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: Heartbeat
    draining: Draining
    session_opened: SessionOpened
    session_ended: SessionEnded
    result: QueryResult
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., draining: _Optional[_Union[Draining, _Mapping]] = ..., session_opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., session_ended: _Optional[_Union[SessionEnded, _Mapping]] = ..., result: _Optional[_Union[QueryResult, _Mapping]] = ...) -> None: ...

class QueryResult(_message.Message):
    __slots__ = ("query_id", "ipc", "outcome")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    IPC_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    ipc: bytes
    outcome: Outcome
    def __init__(self, query_id: _Optional[str] = ..., ipc: _Optional[bytes] = ..., outcome: _Optional[_Union[Outcome, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("worker_version", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    WORKER_VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    worker_version: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, worker_version: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sent_unix_ms", "running_queries")
    SENT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_QUERIES_FIELD_NUMBER: _ClassVar[int]
    sent_unix_ms: int
    running_queries: int
    def __init__(self, sent_unix_ms: _Optional[int] = ..., running_queries: _Optional[int] = ...) -> None: ...

class Draining(_message.Message):
    __slots__ = ("grace_ms", "running_queries")
    GRACE_MS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_QUERIES_FIELD_NUMBER: _ClassVar[int]
    grace_ms: int
    running_queries: int
    def __init__(self, grace_ms: _Optional[int] = ..., running_queries: _Optional[int] = ...) -> None: ...

class ControlMessage(_message.Message):
    __slots__ = ("welcome", "refusal", "run_query", "cancel", "config", "session_open", "session_close")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    RUN_QUERY_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    SESSION_OPEN_FIELD_NUMBER: _ClassVar[int]
    SESSION_CLOSE_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    refusal: Refusal
    run_query: RunQuery
    cancel: Cancel
    config: ConfigPush
    session_open: SessionOpen
    session_close: SessionClose
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., refusal: _Optional[_Union[Refusal, _Mapping]] = ..., run_query: _Optional[_Union[RunQuery, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., config: _Optional[_Union[ConfigPush, _Mapping]] = ..., session_open: _Optional[_Union[SessionOpen, _Mapping]] = ..., session_close: _Optional[_Union[SessionClose, _Mapping]] = ...) -> None: ...

class SessionOpen(_message.Message):
    __slots__ = ("session_id", "policy")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    policy: str
    def __init__(self, session_id: _Optional[str] = ..., policy: _Optional[str] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "ok", "reason", "message", "policy")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    ok: bool
    reason: str
    message: str
    policy: str
    def __init__(self, session_id: _Optional[str] = ..., ok: _Optional[bool] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., policy: _Optional[str] = ...) -> None: ...

class SessionClose(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionEnded(_message.Message):
    __slots__ = ("session_id", "reason")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    reason: str
    def __init__(self, session_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ConfigPush(_message.Message):
    __slots__ = ("revision", "catalog_json", "policies", "policies_revision")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CATALOG_JSON_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    POLICIES_REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: str
    catalog_json: str
    policies: _containers.RepeatedCompositeFieldContainer[PolicyDocument]
    policies_revision: str
    def __init__(self, revision: _Optional[str] = ..., catalog_json: _Optional[str] = ..., policies: _Optional[_Iterable[_Union[PolicyDocument, _Mapping]]] = ..., policies_revision: _Optional[str] = ...) -> None: ...

class PolicyDocument(_message.Message):
    __slots__ = ("name", "yaml")
    NAME_FIELD_NUMBER: _ClassVar[int]
    YAML_FIELD_NUMBER: _ClassVar[int]
    name: str
    yaml: str
    def __init__(self, name: _Optional[str] = ..., yaml: _Optional[str] = ...) -> None: ...

class RunQuery(_message.Message):
    __slots__ = ("query_id", "sql", "policy", "session_id", "parameters")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    SQL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    sql: str
    policy: str
    session_id: str
    parameters: bytes
    def __init__(self, query_id: _Optional[str] = ..., sql: _Optional[str] = ..., policy: _Optional[str] = ..., session_id: _Optional[str] = ..., parameters: _Optional[bytes] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("query_id",)
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    def __init__(self, query_id: _Optional[str] = ...) -> None: ...

class ResultChunk(_message.Message):
    __slots__ = ("query_id", "ipc", "outcome")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    IPC_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    ipc: bytes
    outcome: Outcome
    def __init__(self, query_id: _Optional[str] = ..., ipc: _Optional[bytes] = ..., outcome: _Optional[_Union[Outcome, _Mapping]] = ...) -> None: ...

class Outcome(_message.Message):
    __slots__ = ("ok", "reason", "message", "rows", "queued_s", "run_s", "sandbox", "policy", "reruns")
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_S_FIELD_NUMBER: _ClassVar[int]
    RUN_S_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    RERUNS_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    reason: str
    message: str
    rows: int
    queued_s: float
    run_s: float
    sandbox: str
    policy: str
    reruns: int
    def __init__(self, ok: _Optional[bool] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., rows: _Optional[int] = ..., queued_s: _Optional[float] = ..., run_s: _Optional[float] = ..., sandbox: _Optional[str] = ..., policy: _Optional[str] = ..., reruns: _Optional[int] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("worker_id", "control_plane_version", "heartbeat_interval_ms")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CONTROL_PLANE_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    control_plane_version: str
    heartbeat_interval_ms: int
    def __init__(self, worker_id: _Optional[str] = ..., control_plane_version: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ...) -> None: ...

class Refusal(_message.Message):
    __slots__ = ("reason", "message")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    reason: str
    message: str
    def __init__(self, reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ListTablesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTablesReply(_message.Message):
    __slots__ = ("tables",)
    TABLES_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[CatalogTable]
    def __init__(self, tables: _Optional[_Iterable[_Union[CatalogTable, _Mapping]]] = ...) -> None: ...

class CatalogTable(_message.Message):
    __slots__ = ("name", "format", "connection")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    format: str
    connection: str
    def __init__(self, name: _Optional[str] = ..., format: _Optional[str] = ..., connection: _Optional[str] = ...) -> None: ...

class QueryRequest(_message.Message):
    __slots__ = ("sql", "policy", "session_id")
    SQL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    sql: str
    policy: str
    session_id: str
    def __init__(self, sql: _Optional[str] = ..., policy: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: str
    def __init__(self, policy: _Optional[str] = ...) -> None: ...

class OpenSessionReply(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class QueryChunk(_message.Message):
    __slots__ = ("ipc", "outcome")
    IPC_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ipc: bytes
    outcome: Outcome
    def __init__(self, ipc: _Optional[bytes] = ..., outcome: _Optional[_Union[Outcome, _Mapping]] = ...) -> None: ...
