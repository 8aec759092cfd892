"""Encoders and decoders of the wire formats, each built once.

Only ``decode_*`` here (and ``convert_event`` beside the ``Event`` it builds) turn a
``msgspec`` error into ``InvalidEntryError``: the one typed error every caller handles,
with a reason a person can read.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
import yaml

from govflow.schemas.commands import Command
from govflow.schemas.errors import InvalidEntryError
from govflow.schemas.events import Event, refuse_nul
from govflow.schemas.workflows import Workflow

T = TypeVar("T")

MAX_ENTRY_BYTES = 256 * 1024
ENCODER = msgspec.json.Encoder()
EVENT_DECODER = msgspec.json.Decoder(Event)
COMMAND_DECODER = msgspec.json.Decoder(Command)


class Identity(msgspec.Struct, frozen=True):
    """What names an event, read from an entry that may be no valid event otherwise."""

    id: str
    tenant: Any = ""  # any JSON: an entry whose tenant is no string is still named by its id


IDENTITY_DECODER = msgspec.json.Decoder(Identity)


def encode(value: Any) -> bytes:
    """Encode a wire Struct (or plain data) as JSON."""
    return ENCODER.encode(value)


def decode_event(raw: bytes | str) -> Event:
    """Decode one event from JSON.

    Raises:
        InvalidEntryError: not JSON, too large, a missing or mistyped field, an unknown type.
    """
    event = _decode(EVENT_DECODER, raw, "event", nul=False)
    _refuse_nul_outside_trace(_as_bytes(raw))
    return event


def _refuse_nul_outside_trace(raw: bytes) -> None:
    """Refuse an event holding NUL, unless only its malformed trace context (which decoding
    dropped) holds it: a producer's broken tracing never costs it its event.

    Raises:
        InvalidEntryError: a string that the event keeps holds NUL.
    """
    try:
        refuse_nul(raw, "event")
    except InvalidEntryError as refused:
        try:
            fields = msgspec.json.decode(raw)  # an object: it decoded as an event
        except RecursionError:  # nested deeply in a field the event ignores
            raise refused from None
        fields.pop("traceparent", None)
        fields.pop("tracestate", None)
        refuse_nul(encode(fields), "event")


def decode_identity(raw: bytes | str) -> Identity:
    """Decode the (tenant, id) of an event; every other field is ignored.

    Raises:
        InvalidEntryError: no string ``id``, not JSON, too large.
    """
    return _decode(IDENTITY_DECODER, raw, "event")


def decode_command(raw: bytes | str) -> Command:
    """Decode one workflow-execution command from JSON.

    Raises:
        InvalidEntryError: the command is malformed.
    """
    return _decode(COMMAND_DECODER, raw, "command")


class _AliasRefusedError(yaml.YAMLError):
    def __init__(self, line: int) -> None:
        super().__init__(f"alias at line {line}")
        self.line = line


class _WorkflowLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases ("billion laughs": nine nested aliases of nine
    made a 1 KB definition into 570 MB of JSON to store and cache)."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            alias = self.peek_event()  # type: ignore[no-untyped-call]
            raise _AliasRefusedError(alias.start_mark.line + 1)
        return super().compose_node(parent, index)  # type: ignore[arg-type]


def decode_workflow(text: str | bytes, source: str = "definition") -> Workflow:
    """Parse a workflow definition from YAML (JSON is YAML too) and validate it.

    Raises:
        InvalidEntryError: the file is not YAML, or not a valid definition.
    """
    try:
        data = yaml.load(text, Loader=_WorkflowLoader)  # a SafeLoader, without aliases
    except _AliasRefusedError as e:
        raise InvalidEntryError(
            f"{source}: an alias (*name) at line {e.line}: aliases are not allowed in a"
            " workflow definition (a few of them can expand a small file into gigabytes)"
        ) from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InvalidEntryError(f"{source}: not valid YAML{where}") from e
    except RecursionError as e:  # PyYAML composes nested nodes recursively
        raise InvalidEntryError(f"{source}: nested too deeply") from e
    try:
        return msgspec.convert(data, Workflow)
    except msgspec.ValidationError as e:
        raise InvalidEntryError(f"{source}: {e}") from e
    except RecursionError as e:
        raise InvalidEntryError(f"{source}: nested too deeply") from e


def _decode(decoder: msgspec.json.Decoder[T], raw: bytes | str, what: str, nul: bool = True) -> T:
    size = len(raw)
    if size > MAX_ENTRY_BYTES:
        raise InvalidEntryError(f"{what} is {size} bytes, over the {MAX_ENTRY_BYTES} byte limit")
    try:
        value = decoder.decode(raw)
    except msgspec.ValidationError as e:
        raise InvalidEntryError(f"invalid {what}: {e}") from e
    except msgspec.DecodeError as e:
        raise InvalidEntryError(f"{what} is not valid JSON: {e}") from e
    except UnicodeDecodeError as e:
        # msgspec raises this one, not a DecodeError, for bad bytes inside a JSON string.
        raise InvalidEntryError(f"{what} is not valid UTF-8: {e}") from e
    except RecursionError as e:
        # Objects nested a few thousand deep (in an ignored field, say) exhaust the stack
        # of msgspec's decoder; escaping as RecursionError, they failed the whole batch.
        raise InvalidEntryError(f"{what} is nested too deeply") from e
    if nul:  # after the decoding: a malformed entry's reason says what is malformed
        refuse_nul(_as_bytes(raw), what)
    return value


def _as_bytes(raw: bytes | str) -> bytes:
    return raw if isinstance(raw, bytes) else raw.encode(errors="surrogatepass")


def json_schemas() -> dict[str, Any]:
    """The JSON Schema of events, commands and workflow definitions."""
    (event, command, workflow), components = msgspec.json.schema_components(
        [Event, Command, Workflow], ref_template="#/$defs/{name}"
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$defs": components,
        "event": event,
        "command": command,
        "workflow": workflow,
    }
