from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KIND_UNSPECIFIED: _ClassVar[Kind]
    KIND_TIMEOUT: _ClassVar[Kind]
    KIND_QUEUE_TIMEOUT: _ClassVar[Kind]
    KIND_CANCELLED: _ClassVar[Kind]
    KIND_INVALID: _ClassVar[Kind]
    KIND_FORBIDDEN: _ClassVar[Kind]
    KIND_DNS: _ClassVar[Kind]
    KIND_CONNECT: _ClassVar[Kind]
    KIND_TLS: _ClassVar[Kind]
    KIND_CONNECTION: _ClassVar[Kind]
    KIND_PROTOCOL: _ClassVar[Kind]
    KIND_TOO_LARGE: _ClassVar[Kind]
    KIND_INTERNAL: _ClassVar[Kind]
    KIND_CIRCUIT_OPEN: _ClassVar[Kind]
KIND_UNSPECIFIED: Kind
KIND_TIMEOUT: Kind
KIND_QUEUE_TIMEOUT: Kind
KIND_CANCELLED: Kind
KIND_INVALID: Kind
KIND_FORBIDDEN: Kind
KIND_DNS: Kind
KIND_CONNECT: Kind
KIND_TLS: Kind
KIND_CONNECTION: Kind
KIND_PROTOCOL: Kind
KIND_TOO_LARGE: Kind
KIND_INTERNAL: Kind
KIND_CIRCUIT_OPEN: Kind

class Header(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class Retry(_message.Message):
    __slots__ = ("times", "statuses", "connect_errors")
    TIMES_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    CONNECT_ERRORS_FIELD_NUMBER: _ClassVar[int]
    times: int
    statuses: _containers.RepeatedScalarFieldContainer[int]
    connect_errors: bool
    def __init__(self, times: _Optional[int] = ..., statuses: _Optional[_Iterable[int]] = ..., connect_errors: _Optional[bool] = ...) -> None: ...

class Hedge(_message.Message):
    __slots__ = ("after_msec", "after_percentile")
    AFTER_MSEC_FIELD_NUMBER: _ClassVar[int]
    AFTER_PERCENTILE_FIELD_NUMBER: _ClassVar[int]
    after_msec: int
    after_percentile: float
    def __init__(self, after_msec: _Optional[int] = ..., after_percentile: _Optional[float] = ...) -> None: ...

class Request(_message.Message):
    __slots__ = ("id", "method", "uri", "headers", "body", "text", "timeout_msec", "retry", "hedge", "hedge_unsafe")
    ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MSEC_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    HEDGE_FIELD_NUMBER: _ClassVar[int]
    HEDGE_UNSAFE_FIELD_NUMBER: _ClassVar[int]
    id: str
    method: str
    uri: str
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    body: bytes
    text: str
    timeout_msec: int
    retry: Retry
    hedge: Hedge
    hedge_unsafe: bool
    def __init__(self, id: _Optional[str] = ..., method: _Optional[str] = ..., uri: _Optional[str] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., body: _Optional[bytes] = ..., text: _Optional[str] = ..., timeout_msec: _Optional[int] = ..., retry: _Optional[_Union[Retry, _Mapping]] = ..., hedge: _Optional[_Union[Hedge, _Mapping]] = ..., hedge_unsafe: _Optional[bool] = ...) -> None: ...

class Defaults(_message.Message):
    __slots__ = ("method", "headers", "body", "text", "base_uri", "retry", "hedge", "hedge_unsafe")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    BASE_URI_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    HEDGE_FIELD_NUMBER: _ClassVar[int]
    HEDGE_UNSAFE_FIELD_NUMBER: _ClassVar[int]
    method: str
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    body: bytes
    text: str
    base_uri: str
    retry: Retry
    hedge: Hedge
    hedge_unsafe: bool
    def __init__(self, method: _Optional[str] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., body: _Optional[bytes] = ..., text: _Optional[str] = ..., base_uri: _Optional[str] = ..., retry: _Optional[_Union[Retry, _Mapping]] = ..., hedge: _Optional[_Union[Hedge, _Mapping]] = ..., hedge_unsafe: _Optional[bool] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("timeout_msec", "requests", "defaults", "max_parallel", "timings")
    TIMEOUT_MSEC_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    MAX_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    timeout_msec: int
    requests: _containers.RepeatedCompositeFieldContainer[Request]
    defaults: Defaults
    max_parallel: int
    timings: bool
    def __init__(self, timeout_msec: _Optional[int] = ..., requests: _Optional[_Iterable[_Union[Request, _Mapping]]] = ..., defaults: _Optional[_Union[Defaults, _Mapping]] = ..., max_parallel: _Optional[int] = ..., timings: _Optional[bool] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queued_msec", "dns_msec", "connect_msec", "tls_msec", "ttfb_msec", "body_msec", "total_msec", "reused")
    QUEUED_MSEC_FIELD_NUMBER: _ClassVar[int]
    DNS_MSEC_FIELD_NUMBER: _ClassVar[int]
    CONNECT_MSEC_FIELD_NUMBER: _ClassVar[int]
    TLS_MSEC_FIELD_NUMBER: _ClassVar[int]
    TTFB_MSEC_FIELD_NUMBER: _ClassVar[int]
    BODY_MSEC_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MSEC_FIELD_NUMBER: _ClassVar[int]
    REUSED_FIELD_NUMBER: _ClassVar[int]
    queued_msec: float
    dns_msec: float
    connect_msec: float
    tls_msec: float
    ttfb_msec: float
    body_msec: float
    total_msec: float
    reused: bool
    def __init__(self, queued_msec: _Optional[float] = ..., dns_msec: _Optional[float] = ..., connect_msec: _Optional[float] = ..., tls_msec: _Optional[float] = ..., ttfb_msec: _Optional[float] = ..., body_msec: _Optional[float] = ..., total_msec: _Optional[float] = ..., reused: _Optional[bool] = ...) -> None: ...

class Success(_message.Message):
    __slots__ = ("status", "headers", "content", "duration_msec", "content_encoding")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    DURATION_MSEC_FIELD_NUMBER: _ClassVar[int]
    CONTENT_ENCODING_FIELD_NUMBER: _ClassVar[int]
    status: int
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    content: bytes
    duration_msec: int
    content_encoding: str
    def __init__(self, status: _Optional[int] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., content: _Optional[bytes] = ..., duration_msec: _Optional[int] = ..., content_encoding: _Optional[str] = ...) -> None: ...

class Failure(_message.Message):
    __slots__ = ("error", "kind", "duration_msec")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DURATION_MSEC_FIELD_NUMBER: _ClassVar[int]
    error: str
    kind: Kind
    duration_msec: int
    def __init__(self, error: _Optional[str] = ..., kind: _Optional[_Union[Kind, str]] = ..., duration_msec: _Optional[int] = ...) -> None: ...

class Outcome(_message.Message):
    __slots__ = ("index", "id", "success", "failure", "attempts", "timings", "hedged", "hedge_won")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    HEDGED_FIELD_NUMBER: _ClassVar[int]
    HEDGE_WON_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: str
    success: Success
    failure: Failure
    attempts: int
    timings: Timings
    hedged: bool
    hedge_won: bool
    def __init__(self, index: _Optional[int] = ..., id: _Optional[str] = ..., success: _Optional[_Union[Success, _Mapping]] = ..., failure: _Optional[_Union[Failure, _Mapping]] = ..., attempts: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., hedged: _Optional[bool] = ..., hedge_won: _Optional[bool] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[Outcome]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[Outcome, _Mapping]]] = ...) -> None: ...
