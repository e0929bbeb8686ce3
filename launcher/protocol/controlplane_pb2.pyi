from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

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
    __slots__ = ("worker_id", "certificate_pem", "ca_pem", "control_plane_version")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    CONTROL_PLANE_VERSION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    certificate_pem: bytes
    ca_pem: bytes
    control_plane_version: str
    def __init__(self, worker_id: _Optional[str] = ..., certificate_pem: _Optional[bytes] = ..., ca_pem: _Optional[bytes] = ..., control_plane_version: _Optional[str] = ...) -> None: ...
