from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GroupKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GROUP_KIND_UNSPECIFIED: _ClassVar[GroupKind]
    ATTENTION: _ClassVar[GroupKind]
    STATE: _ClassVar[GroupKind]
GROUP_KIND_UNSPECIFIED: GroupKind
ATTENTION: GroupKind
STATE: GroupKind

class GroupQuery(_message.Message):
    __slots__ = ("group_id", "kind", "hashes_per_block")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    HASHES_PER_BLOCK_FIELD_NUMBER: _ClassVar[int]
    group_id: int
    kind: GroupKind
    hashes_per_block: int
    def __init__(self, group_id: _Optional[int] = ..., kind: _Optional[_Union[GroupKind, str]] = ..., hashes_per_block: _Optional[int] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("namespace", "rank", "hashes_packed", "hash_len", "hashes_per_boundary", "groups", "start_boundary", "max_boundary", "with_details")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    HASHES_PACKED_FIELD_NUMBER: _ClassVar[int]
    HASH_LEN_FIELD_NUMBER: _ClassVar[int]
    HASHES_PER_BOUNDARY_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    START_BOUNDARY_FIELD_NUMBER: _ClassVar[int]
    MAX_BOUNDARY_FIELD_NUMBER: _ClassVar[int]
    WITH_DETAILS_FIELD_NUMBER: _ClassVar[int]
    namespace: bytes
    rank: int
    hashes_packed: bytes
    hash_len: int
    hashes_per_boundary: int
    groups: _containers.RepeatedCompositeFieldContainer[GroupQuery]
    start_boundary: int
    max_boundary: int
    with_details: bool
    def __init__(self, namespace: _Optional[bytes] = ..., rank: _Optional[int] = ..., hashes_packed: _Optional[bytes] = ..., hash_len: _Optional[int] = ..., hashes_per_boundary: _Optional[int] = ..., groups: _Optional[_Iterable[_Union[GroupQuery, _Mapping]]] = ..., start_boundary: _Optional[int] = ..., max_boundary: _Optional[int] = ..., with_details: _Optional[bool] = ...) -> None: ...

class GroupPresence(_message.Message):
    __slots__ = ("group_id", "present")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    group_id: int
    present: bool
    def __init__(self, group_id: _Optional[int] = ..., present: _Optional[bool] = ...) -> None: ...

class BoundaryDetail(_message.Message):
    __slots__ = ("boundary", "groups", "prefix_ok")
    BOUNDARY_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_OK_FIELD_NUMBER: _ClassVar[int]
    boundary: int
    groups: _containers.RepeatedCompositeFieldContainer[GroupPresence]
    prefix_ok: bool
    def __init__(self, boundary: _Optional[int] = ..., groups: _Optional[_Iterable[_Union[GroupPresence, _Mapping]]] = ..., prefix_ok: _Optional[bool] = ...) -> None: ...

class LookupReply(_message.Message):
    __slots__ = ("boundary", "reason", "details", "attention_boundary")
    BOUNDARY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BOUNDARY_FIELD_NUMBER: _ClassVar[int]
    boundary: int
    reason: str
    details: _containers.RepeatedCompositeFieldContainer[BoundaryDetail]
    attention_boundary: int
    def __init__(self, boundary: _Optional[int] = ..., reason: _Optional[str] = ..., details: _Optional[_Iterable[_Union[BoundaryDetail, _Mapping]]] = ..., attention_boundary: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("keys", "chunk_bytes")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    chunk_bytes: int
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class GetChunk(_message.Message):
    __slots__ = ("sizes", "data")
    SIZES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, sizes: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutItem(_message.Message):
    __slots__ = ("key", "value", "parent")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    parent: bytes
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., parent: _Optional[bytes] = ...) -> None: ...

class PutBatch(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[PutItem]
    def __init__(self, items: _Optional[_Iterable[_Union[PutItem, _Mapping]]] = ...) -> None: ...

class PutReply(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    def __init__(self, stored: _Optional[int] = ...) -> None: ...

class KeysRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ContainsReply(_message.Message):
    __slots__ = ("present",)
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    present: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, present: _Optional[_Iterable[bool]] = ...) -> None: ...

class CountReply(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("keys", "pinned")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    pinned: bool
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., pinned: _Optional[bool] = ...) -> None: ...

class ScanRequest(_message.Message):
    __slots__ = ("prefix", "limit")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    prefix: bytes
    limit: int
    def __init__(self, prefix: _Optional[bytes] = ..., limit: _Optional[int] = ...) -> None: ...

class ScanEntry(_message.Message):
    __slots__ = ("key", "size", "pinned", "children")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    CHILDREN_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    size: int
    pinned: bool
    children: int
    def __init__(self, key: _Optional[bytes] = ..., size: _Optional[int] = ..., pinned: _Optional[bool] = ..., children: _Optional[int] = ...) -> None: ...

class ScanReply(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[ScanEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[ScanEntry, _Mapping]]] = ...) -> None: ...

class FlushRequest(_message.Message):
    __slots__ = ("prefix",)
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    prefix: bytes
    def __init__(self, prefix: _Optional[bytes] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("ok", "backend", "version", "entries", "bulk_port", "nixl_agent", "nixl_metadata")
    OK_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BULK_PORT_FIELD_NUMBER: _ClassVar[int]
    NIXL_AGENT_FIELD_NUMBER: _ClassVar[int]
    NIXL_METADATA_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    backend: str
    version: str
    entries: int
    bulk_port: int
    nixl_agent: str
    nixl_metadata: bytes
    def __init__(self, ok: _Optional[bool] = ..., backend: _Optional[str] = ..., version: _Optional[str] = ..., entries: _Optional[int] = ..., bulk_port: _Optional[int] = ..., nixl_agent: _Optional[str] = ..., nixl_metadata: _Optional[bytes] = ...) -> None: ...

class Extent(_message.Message):
    __slots__ = ("address", "length", "generation", "checksum")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    address: int
    length: int
    generation: int
    checksum: int
    def __init__(self, address: _Optional[int] = ..., length: _Optional[int] = ..., generation: _Optional[int] = ..., checksum: _Optional[int] = ...) -> None: ...

class LocateRequest(_message.Message):
    __slots__ = ("keys", "lease_s")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    lease_s: float
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., lease_s: _Optional[float] = ...) -> None: ...

class LocateReply(_message.Message):
    __slots__ = ("lease_id", "nixl_agent", "address", "length", "generation", "region")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    NIXL_AGENT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    nixl_agent: str
    address: _containers.RepeatedScalarFieldContainer[int]
    length: _containers.RepeatedScalarFieldContainer[int]
    generation: _containers.RepeatedScalarFieldContainer[int]
    region: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, lease_id: _Optional[int] = ..., nixl_agent: _Optional[str] = ..., address: _Optional[_Iterable[int]] = ..., length: _Optional[_Iterable[int]] = ..., generation: _Optional[_Iterable[int]] = ..., region: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_id", "read_bytes")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    READ_BYTES_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    read_bytes: int
    def __init__(self, lease_id: _Optional[int] = ..., read_bytes: _Optional[int] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("sizes", "ttl_s")
    SIZES_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    ttl_s: float
    def __init__(self, sizes: _Optional[_Iterable[int]] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class ReserveReply(_message.Message):
    __slots__ = ("reservation_id", "extents", "nixl_agent")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    EXTENTS_FIELD_NUMBER: _ClassVar[int]
    NIXL_AGENT_FIELD_NUMBER: _ClassVar[int]
    reservation_id: int
    extents: _containers.RepeatedCompositeFieldContainer[Extent]
    nixl_agent: str
    def __init__(self, reservation_id: _Optional[int] = ..., extents: _Optional[_Iterable[_Union[Extent, _Mapping]]] = ..., nixl_agent: _Optional[str] = ...) -> None: ...

class CommitItem(_message.Message):
    __slots__ = ("index", "key", "parent", "checksum")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    index: int
    key: bytes
    parent: bytes
    checksum: int
    def __init__(self, index: _Optional[int] = ..., key: _Optional[bytes] = ..., parent: _Optional[bytes] = ..., checksum: _Optional[int] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("reservation_id", "items")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: int
    items: _containers.RepeatedCompositeFieldContainer[CommitItem]
    def __init__(self, reservation_id: _Optional[int] = ..., items: _Optional[_Iterable[_Union[CommitItem, _Mapping]]] = ...) -> None: ...
