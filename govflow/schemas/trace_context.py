"""The W3C trace context an event or a command may carry: optional, never a reason to refuse.

``traceparent`` and ``tracestate`` hold the trace context (https://www.w3.org/TR/trace-context/)
of the span that produced the entry, so that a trace runs from the publisher through both
streams to the webhook (docs/tracing.md). Both are left out of the JSON when absent, so an
entry without them is byte for byte what it was before they existed.

A producer's broken tracing must not cost it its event: a value that is no valid
``traceparent`` (any JSON at all: a number, a string of another shape) is dropped when the
entry is decoded, with its ``tracestate``; a ``tracestate`` that is not 1 to 512 characters
of printable ASCII is dropped alone. The JSON Schema shows the shapes a producer
should send.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

# version - trace-id - parent-id - flags, lower-case hex. Version ff and all-zero ids are
# invalid; a later version's longer form is not understood, so it is dropped too.
TRACEPARENT_PATTERN = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
TRACESTATE_MAX = 512
_TRACEPARENT = re.compile(TRACEPARENT_PATTERN)
_TRACESTATE = re.compile(r"^[\x20-\x7e]*$")
_ZERO_TRACE_ID = "0" * 32
_ZERO_PARENT_ID = "0" * 16

# Any JSON is taken, so that a malformed value cannot fail the entry's decoding; the
# entry's ``__post_init__`` keeps only a valid one (``keep_valid``).
TraceParent = Annotated[
    Any,
    msgspec.Meta(
        description="W3C traceparent of the span that produced this; ignored when malformed",
        extra_json_schema={"type": "string", "pattern": TRACEPARENT_PATTERN},
    ),
]
TraceState = Annotated[
    Any,
    msgspec.Meta(
        description="W3C tracestate that goes with traceparent; ignored when malformed",
        extra_json_schema={"type": "string", "maxLength": TRACESTATE_MAX},
    ),
]


def is_traceparent(value: object) -> bool:
    """Whether ``value`` is a W3C ``traceparent`` this version of the format understands."""
    return (
        isinstance(value, str)
        and _TRACEPARENT.match(value) is not None
        and not value.startswith("ff")
        and value[3:35] != _ZERO_TRACE_ID
        and value[36:52] != _ZERO_PARENT_ID
    )


def is_tracestate(value: object) -> bool:
    """Whether ``value`` is a ``tracestate`` worth passing on: 1 to 512 printable ASCII."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= TRACESTATE_MAX
        and _TRACESTATE.match(value) is not None
    )


def keep_valid(entry: msgspec.Struct) -> None:
    """Drop ``entry``'s malformed ``traceparent`` (with its ``tracestate``) or ``tracestate``.

    Called from ``__post_init__``, which runs on every decode, convert and construction.
    """
    traceparent = getattr(entry, "traceparent", msgspec.UNSET)
    tracestate = getattr(entry, "tracestate", msgspec.UNSET)
    if traceparent is msgspec.UNSET and tracestate is msgspec.UNSET:
        return  # the usual case: no trace context at all
    if not is_traceparent(traceparent):
        traceparent = tracestate = msgspec.UNSET
    elif not is_tracestate(tracestate):
        tracestate = msgspec.UNSET
    msgspec.structs.force_setattr(entry, "traceparent", traceparent)
    msgspec.structs.force_setattr(entry, "tracestate", tracestate)
