"""Finished spans as an OTLP/protobuf export request, written straight to wire bytes.

The SDK's encoder (opentelemetry-exporter-otlp-proto-common's `encode_spans`) builds a protobuf
object for every span, attribute and value in Python, then serializes them. Writing the same
fields as bytes costs a quarter to a third of that (`python -m bench.span_encoding`), little
enough to do in the process that made the spans, so that the span export process only sends
what it is given (llmq/span_export.py). The request is the one the SDK's encoder makes for the
same spans: the tests parse both and compare them.

Wire format (protobuf encoding, opentelemetry/proto/trace/v1/trace.proto): every field is its
tag, `field number << 3 | wire type`, then a varint, 8 or 4 little-endian bytes, or a length and
that many bytes (strings, bytes and messages). Scalar fields at their default are left out.
"""

import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags
from opentelemetry.sdk.trace import ReadableSpan

log = logging.getLogger(__name__)

_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
_DOUBLE = struct.Struct("<d").pack
_INT64 = range(-(2**63), 2**63)


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _BYTE[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_BYTE = [bytes((n,)) for n in range(0x80)]  # every varint below 128: one byte


def _delimited(tag: bytes, payload: bytes) -> bytes:
    n = len(payload)
    return tag + (_BYTE[n] if n < 0x80 else _varint(n)) + payload


def _text(tag: bytes, text: str) -> bytes:
    return _delimited(tag, text.encode())


def _any_value(value: Any) -> bytes:
    """An AnyValue's fields (common.proto), as the SDK's `_encode_value` chooses them."""
    kind = type(value)
    if kind is str:
        return _text(b"\x0a", value)
    if kind is int and 0 <= value < 0x80:
        return b"\x18" + _BYTE[value]
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _text(b"\x0a", value)
    if isinstance(value, int):
        if value not in _INT64:
            raise ValueError(f"{value} does not fit an int64")
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, bytes):
        return _delimited(b"\x3a", value)
    if isinstance(value, Sequence):  # ArrayValue
        return _delimited(b"\x2a", b"".join(_delimited(b"\x0a", _any_value(v)) for v in value))
    if isinstance(value, Mapping):  # KeyValueList
        pairs = (_key_value(str(k), v) for k, v in value.items())
        return _delimited(b"\x32", b"".join(_delimited(b"\x0a", kv) for kv in pairs))
    raise TypeError(f"invalid type {type(value).__name__} of value {value!r}")


# Attributes as encoded, by tag, name, type and value: most recur request after request (a
# method, a route, a statement, a queue). The type tells True from 1 and 1.0, which are equal.
_fields: dict[tuple, bytes] = {}
MAX_FIELDS_KEPT = 4096
MAX_TEXT_KEPT = 1024  # characters of a text value kept


def _key_value(key: str, value: Any) -> bytes:
    return _text(b"\x0a", key) + _delimited(b"\x12", _any_value(value))


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    """A repeated KeyValue field; a value that cannot be encoded is left out, as the SDK does."""
    if not attributes:
        return b""
    out = []
    for key, value in attributes.items():
        kind = type(value)
        cacheable = (kind is str and len(value) <= MAX_TEXT_KEPT) or kind in (int, bool, float)
        if cacheable and (field := _fields.get((tag, key, kind, value))) is not None:
            out.append(field)
            continue
        try:
            field = _delimited(tag, _key_value(key, value))
        except (TypeError, ValueError) as exc:
            log.error("span attribute %s not exported: %s", key, exc)
            continue
        if cacheable:
            if len(_fields) >= MAX_FIELDS_KEPT:
                _fields.clear()
            _fields[(tag, key, kind, value)] = field
        out.append(field)
    return b"".join(out)


def _count(tag: bytes, count: int) -> bytes:
    return tag + _varint(count) if count else b""


# A Span's flags field (fixed32): whether its parent (or a link's span) is remote is known, and
# whether it is.
_LOCAL_FLAGS = _FIXED32(SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK)
_REMOTE_FLAGS = _FIXED32(
    SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
)


def _flags(parent) -> bytes:
    return _REMOTE_FLAGS if parent is not None and parent.is_remote else _LOCAL_FLAGS


# Status (trace.proto) for each StatusCode value, when the span has no description.
_STATUS = {0: b"\x7a\x00", 1: b"\x7a\x02\x18\x01", 2: b"\x7a\x02\x18\x02"}


def encode_span(span: ReadableSpan) -> bytes:
    """A Span message's fields."""
    context, parent = span.get_span_context(), span.parent
    parts = [
        b"\x0a\x10" + context.trace_id.to_bytes(16, "big"),
        b"\x12\x08" + context.span_id.to_bytes(8, "big"),
    ]
    if context.trace_state:
        parts.append(_text(b"\x1a", ",".join(f"{k}={v}" for k, v in context.trace_state.items())))
    if parent is not None:
        parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
    parts.append(_text(b"\x2a", span.name))
    parts.append(_BYTE[0x30] + _BYTE[span.kind.value + 1])  # SDK kinds count from 0, OTLP's from 1
    if span.start_time:
        parts.append(b"\x39" + _FIXED64(span.start_time))
    if span.end_time:
        parts.append(b"\x41" + _FIXED64(span.end_time))
    parts.append(_attributes(b"\x4a", span.attributes))
    if span.dropped_attributes:
        parts.append(b"\x50" + _varint(span.dropped_attributes))
    for event in span.events:
        fields = b"\x09" + _FIXED64(event.timestamp) if event.timestamp else b""
        fields += _text(b"\x12", event.name) + _attributes(b"\x1a", event.attributes)
        parts.append(_delimited(b"\x5a", fields + _count(b"\x20", event.dropped_attributes)))
    if span.dropped_events:
        parts.append(b"\x60" + _varint(span.dropped_events))
    for link in span.links:
        fields = b"\x0a\x10" + link.context.trace_id.to_bytes(16, "big")
        fields += b"\x12\x08" + link.context.span_id.to_bytes(8, "big")
        fields += _attributes(b"\x22", link.attributes) + _count(b"\x28", link.dropped_attributes)
        parts.append(_delimited(b"\x6a", fields + b"\x35" + _flags(link.context)))
    if span.dropped_links:
        parts.append(b"\x70" + _varint(span.dropped_links))
    status = span.status
    if status is not None:
        code = status.status_code.value
        if status.description:
            message = _text(b"\x12", status.description)
            parts.append(_delimited(b"\x7a", message + (b"\x18" + _varint(code) if code else b"")))
        else:
            parts.append(_STATUS[code])
    parts.append(b"\x85\x01" + _flags(parent))
    return b"".join(parts)


class RequestEncoder:
    """Encodes batches of finished spans as ExportTraceServiceRequest bytes. A process's spans
    share a few resources and instrumentation scopes, each encoded once."""

    MAX_KEPT = 64  # resources and scopes whose encoding is kept; past it all are encoded anew

    def __init__(self) -> None:
        # A resource by id() (hashing one hashes its attributes as JSON), with the resource
        # itself, so that a reused id is told apart; a scope by its name, version and schema,
        # which is how the SDK tells scopes apart.
        self._resources: dict[int, tuple[Any, bytes]] = {}
        self._scopes: dict[Any, bytes] = {}

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        """The request for `spans`: grouped by resource, then by instrumentation scope, in the
        order each first comes, as the SDK's encoder groups them."""
        # resource key → (its encoding, scope → (its encoding, its spans' encodings))
        groups: dict[int, tuple[bytes, dict[Any, tuple[bytes, list[bytes]]]]] = {}
        for span in spans:
            key = id(span.resource)
            group = groups.get(key)
            if group is None:
                group = groups[key] = (self._resource(span.resource), {})
            scope = span.instrumentation_scope
            in_scope = group[1].get(scope)
            if in_scope is None:
                in_scope = group[1][scope] = (self._scope(scope), [])
            in_scope[1].append(_delimited(b"\x12", encode_span(span)))
        return b"".join(
            _delimited(
                b"\x0a",
                resource
                + b"".join(
                    _delimited(b"\x12", scope + b"".join(encoded))
                    for scope, encoded in scopes.values()
                ),
            )
            for resource, scopes in groups.values()
        )

    def _resource(self, resource) -> bytes:
        kept = self._resources.get(id(resource))
        if kept is None or kept[0] is not resource:
            kept = self._keep(self._resources)[id(resource)] = (resource, _resource(resource))
        return kept[1]

    def _scope(self, scope) -> bytes:
        encoded = self._scopes.get(scope)
        if encoded is None:
            encoded = self._keep(self._scopes)[scope] = _scope(scope)
        return encoded

    def _keep(self, cache: dict) -> dict:
        if len(cache) >= self.MAX_KEPT:
            cache.clear()
        return cache


def _resource(resource) -> bytes:
    """A ResourceSpans's fields before its scopes: the resource, and its schema URL (which the
    protobuf encoding may put anywhere in the message)."""
    fields = _delimited(b"\x0a", _attributes(b"\x0a", resource.attributes))
    return fields + (_text(b"\x1a", resource.schema_url) if resource.schema_url else b"")


def _scope(scope) -> bytes:
    """A ScopeSpans's fields before its spans: the scope and its schema URL."""
    if scope is None:
        return _delimited(b"\x0a", b"")
    fields = _text(b"\x0a", scope.name) if scope.name else b""
    fields += _text(b"\x12", scope.version) if scope.version else b""
    fields += _attributes(b"\x1a", scope.attributes)
    schema = _text(b"\x1a", scope.schema_url) if scope.schema_url else b""
    return _delimited(b"\x0a", fields) + schema
