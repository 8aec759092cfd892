"""Bad input, generated: decoders, the events stream under a running worker, workflow files.

README.md, "Guarantees": an entry that is not an event goes to the dead-letter stream with
the reason, and the group keeps flowing; a poison entry never blocks its group. Hypothesis generates the
input; every decoder may answer only with a value or ``InvalidEntryError``, and a worker
process fed anything at all stays up and dead-letters what it cannot run, with a reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, get_args

import msgspec
import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis import Redis

from govflow.db.workflows import apply_workflow
from govflow.plugins.registry import check_actions, registry
from govflow.schemas.codec import (
    MAX_ENTRY_BYTES,
    decode_command,
    decode_event,
    decode_workflow,
    encode,
)
from govflow.schemas.errors import InvalidEntryError
from govflow.schemas.events import ENTITIES, EventType, new_event
from govflow.schemas.keys import Keys
from govflow.schemas.workflows import TRIGGER_OF_CHANGE, Workflow
from tests._servers import run_async
from tests.pipeline_helpers import terminate

T = TypeVar("T")
GOVFLOW = Path(sys.executable).parent / "govflow"
DEEP = b'{"id": "x", "nested": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001
EVENT_TYPES: tuple[str, ...] = get_args(EventType)


def json_values(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    """Any JSON value, small, with strings from ``text``."""
    return st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | text,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
        max_leaves=10,
    )


# Any JSON value, small; and one whose strings hold no NUL, which Postgres cannot store.
JSON = json_values(st.text(max_size=20))
NO_NUL = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=20)
STORABLE_JSON = json_values(NO_NUL)
PLAIN_TEXT = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1, max_size=20
)


@st.composite
def event_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """An event as a producer might write it: valid, with any ``data`` at all."""
    return {
        # Fresh for every draw: the stream and the tables outlive one example.
        "id": uuid.uuid4().hex,
        "type": draw(st.sampled_from(EVENT_TYPES)),
        "tenant": draw(PLAIN_TEXT),
        "entity_id": draw(PLAIN_TEXT),
        "occurred_at": "2026-11-28T09:30:00Z",
        "data": draw(st.dictionaries(NO_NUL, STORABLE_JSON, max_size=4)),
    }


@st.composite
def mutated_event_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event with one field dropped, replaced by any JSON value, or added."""
    event = draw(event_dicts())
    field = draw(st.sampled_from([*event, "changes", "schema_version", "depth", "extra"]))
    how = draw(st.sampled_from(["drop", "replace"]))
    if how == "drop":
        event.pop(field, None)
    else:
        event[field] = draw(JSON)
    return event


def decoded_or_reason(decode: Callable[[Any], T], raw: Any) -> tuple[T | None, str | None]:
    """What ``decode`` made of ``raw``, or why it refused; any other exception escapes."""
    try:
        return decode(raw), None
    except InvalidEntryError as e:
        return None, e.reason


class TestDecoders:
    """Every decoder answers a value or ``InvalidEntryError``, whatever it is given."""

    @settings(max_examples=200, deadline=None)
    @given(raw=st.binary(max_size=300))
    @example(raw=DEEP)
    @example(raw=b"[" * 100_000)
    @example(raw=b"\xff\xfe{}")
    @example(raw=b"x" * (MAX_ENTRY_BYTES + 1))
    def test_arbitrary_bytes(self, raw: bytes) -> None:
        for decode in (decode_event, decode_command):
            _, reason = decoded_or_reason(decode, raw)
            assert reason is None or reason

    @settings(max_examples=200, deadline=None)
    @given(value=JSON | event_dicts() | mutated_event_dicts())
    def test_arbitrary_json(self, value: Any) -> None:
        raw = msgspec.json.encode(value)
        for decode in (decode_event, decode_command):
            decoded, reason = decoded_or_reason(decode, raw)
            if reason is None:
                assert decode(encode(decoded)) == decoded  # what decodes survives a round trip
            else:
                assert reason

    @settings(max_examples=100, deadline=None)
    @given(value=event_dicts())
    def test_a_valid_event_decodes(self, value: dict[str, Any]) -> None:
        assert decode_event(msgspec.json.encode(value)).id == value["id"]


@st.composite
def workflow_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """Something shaped like a workflow definition, with any actions and parameters."""
    names = st.sampled_from(sorted(registry())) | st.text(max_size=12)
    params = st.dictionaries(
        st.sampled_from(["approvers", "title", "assignee", "webhook", "to", "message", "x"]),
        JSON,
        max_size=3,
    )
    value: dict[str, Any] = {
        "name": draw(st.from_regex(r"[a-z0-9][a-z0-9_.\-]{0,20}", fullmatch=True) | st.text()),
        "entity": draw(st.sampled_from([*ENTITIES, "invoice"])),
        "trigger": draw(st.sampled_from([*TRIGGER_OF_CHANGE.values(), "explode"])),
        "actions": draw(
            st.lists(st.dictionaries(names, params, min_size=1, max_size=2), max_size=3)
        ),
    }
    if draw(st.booleans()):
        value["when"] = draw(st.lists(st.dictionaries(
            st.sampled_from(["field", "equals", "in", "changed", "x"]), JSON, max_size=3,
        ), max_size=2))  # fmt: skip
    return value


def accept_or_refuse(text: str | bytes) -> Workflow | None:
    """Decode and check a definition; only ``InvalidEntryError`` may refuse it."""

    def decode_and_check(raw: str | bytes) -> Workflow:
        wf = decode_workflow(raw, "fuzz.yaml")
        check_actions(wf.steps(), "fuzz.yaml")
        return wf

    wf, reason = decoded_or_reason(decode_and_check, text)
    assert reason is None or reason.startswith("fuzz.yaml")  # it names the file
    return wf


class TestWorkflowFiles:
    @settings(max_examples=200, deadline=None)
    @given(text=st.text(max_size=200) | st.binary(max_size=200))
    @example(text="a: [" * 5000)
    @example(text="- " * 5000)
    @example(text="name: x\n" + "when: " + "[" * 3000)
    @example(text="!!python/object/apply:os.system ['true']")
    @example(text="a: &a [*a, *a]")
    def test_arbitrary_text(self, text: str | bytes) -> None:
        accept_or_refuse(text)

    @settings(max_examples=200, deadline=None)
    @given(value=workflow_dicts())
    def test_arbitrary_definitions(self, value: dict[str, Any]) -> None:
        wf = accept_or_refuse(msgspec.json.encode(value))
        if wf is not None:
            assert wf.name == value["name"]


# ---------------------------------------------------------------- a running worker


def catch_all_workflows() -> list[Workflow]:
    """One workflow per entity and trigger: every valid event runs exactly one."""
    return [
        decode_workflow(
            json.dumps(
                {
                    "name": f"all-{entity}-{trigger}",
                    "entity": entity,
                    "trigger": trigger,
                    "actions": [{"create_task": {"title": "Check {data.title}"}}],
                }
            )
        )
        for entity in ENTITIES
        for trigger in TRIGGER_OF_CHANGE.values()
    ]


class Fed(msgspec.Struct):
    """The worker under test and the clients to feed it and read what it did."""

    redis: Redis
    db: psycopg.Connection[Any]
    keys: Keys
    proc: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def drained(fed: Fed) -> bool:
    """Nothing pending or undelivered in either group, nothing waiting for a retry."""
    for stream, group in ((fed.keys.events(), "triggers"), (fed.keys.commands(), "actions")):
        if not fed.redis.exists(stream):
            continue
        groups = {info["name"]: info for info in fed.redis.xinfo_groups(stream)}
        info = groups.get(group.encode())
        if info is None:  # "worker.started" comes before its consumers create their groups
            return False
        if info["pending"]:
            return False
        last = info["last-delivered-id"].decode()
        if fed.redis.xrange(stream, min=f"({last}", max="+", count=1):
            return False
    return fed.redis.zcard(fed.keys.retry()) == 0


def wait_drained(fed: Fed, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not drained(fed):
        assert fed.alive(), f"the worker died:\n{fed.tail()}"
        assert time.monotonic() < deadline, f"not drained within {within}s\n{fed.tail()}"
        time.sleep(0.1)


@pytest.fixture
def fed(redis_server_url: str, database_url: str, prefix: str, tmp_path: Path) -> Iterator[Fed]:
    """A ``govflow run`` process on this test's prefix and database, with the catch-alls."""

    async def store() -> None:
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            for wf in catch_all_workflows():
                await apply_workflow(conn, wf)

    run_async(store)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOVFLOW_")}
    env.update(
        GOVFLOW_REDIS_URL=redis_server_url,
        GOVFLOW_DATABASE_URL=database_url,
        GOVFLOW_PREFIX=prefix,
        GOVFLOW_BACKOFF_BASE="0.02",
        GOVFLOW_CLAIM_IDLE="2",
    )
    log = tmp_path / "worker.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [str(GOVFLOW), "run", "--role", "triggers,actions", "--concurrency", "1"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    redis = Redis.from_url(redis_server_url, socket_timeout=10)
    try:
        deadline = time.monotonic() + 90
        while b'"worker.started"' not in log.read_bytes():
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.1)
        with psycopg.connect(database_url, autocommit=True) as db:
            yield Fed(redis, db, Keys(prefix), proc, log)
    finally:
        redis.close()
        terminate(proc)


# What a producer may leave on the events stream: (kind, fields).
ATTEMPTS = st.integers(-(2**70), 2**70).map(lambda i: str(i).encode()) | st.binary(max_size=6)
CONTROL = st.dictionaries(
    st.sampled_from([b"attempt", b"replay_of", b"hold", b"seal"]),
    st.binary(max_size=12),
    min_size=1,
)
ENTRIES = st.one_of(
    st.tuples(st.just("valid"), st.builds(lambda e: {b"event": msgspec.json.encode(e)}, event_dicts())),
    st.tuples(st.just("mutated"), st.builds(lambda e: {b"event": msgspec.json.encode(e)}, mutated_event_dicts())),
    st.tuples(st.just("bad"), st.builds(lambda b: {b"event": b}, st.binary(max_size=100))),
    st.tuples(st.just("bad"), st.builds(lambda v: {b"event": msgspec.json.encode(v)}, JSON)),
    st.tuples(
        st.just("bad"),
        st.dictionaries(
            st.binary(min_size=1, max_size=10).filter(lambda k: k not in (b"event", b"attempt")),
            st.binary(max_size=40),
            min_size=1,
            max_size=3,
        ),
    ),
    st.tuples(
        st.just("bad"), st.builds(lambda b, a: {b"event": b, b"attempt": a}, st.binary(max_size=30), ATTEMPTS)
    ),
    st.tuples(
        st.just("valid"),
        st.builds(lambda e, a: {b"event": msgspec.json.encode(e), b"attempt": a}, event_dicts(), ATTEMPTS),
    ),
    # A producer's control fields, unsealed: ignored, so the event runs as any other.
    st.tuples(st.just("valid"), st.builds(
        lambda e, c: {b"event": msgspec.json.encode(e), **c}, event_dicts(), CONTROL,
    )),
    # NUL in a string of the data (a key or a value): Postgres cannot store it.
    st.tuples(st.just("bad"), st.builds(
        lambda e, text, in_key: {b"event": msgspec.json.encode(
            {**e, "data": {text + "\x00": 1} if in_key else {"k": [text, "\x00" + text]}}
        )},
        event_dicts(), st.text(max_size=4), st.booleans(),
    )),
    # More fields than the wire format has.
    st.tuples(st.just("bad"), st.builds(
        lambda e, n: {b"event": msgspec.json.encode(e)} | {f"x{i}".encode(): b"1" for i in range(n)},
        event_dicts(), st.integers(5, 60),
    )),
    # One id, two tenants, and the first published twice: each (tenant, id) runs once.
    st.tuples(st.just("twins"), st.builds(lambda e: {b"event": msgspec.json.encode(e)}, event_dicts())),
)  # fmt: skip
TENANTS = ("acme", "globex")


def expand(entries: list[tuple[str, dict[bytes, bytes]]]) -> list[tuple[str, dict[bytes, bytes]]]:
    """Each ``twins`` entry as its event for each tenant, and the first tenant's again."""
    out = []
    for kind, fields in entries:
        if kind != "twins":
            out.append((kind, fields))
            continue
        event = json.loads(fields[b"event"])
        twins = [{b"event": json.dumps({**event, "tenant": t}).encode()} for t in TENANTS]
        out += [("valid", twins[0]), ("valid", twins[1]), ("again", twins[0])]
    return out


@pytest.mark.slow
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(entries=st.lists(ENTRIES, min_size=1, max_size=8))
@example(entries=[("bad", {b"event": DEEP}), ("valid", {b"event": b"VALID"})])
@example(entries=[("bad", {b"event": b"garbage", b"attempt": b"99999999999"})])
@example(entries=[("bad", {b"event": b"x" * (MAX_ENTRY_BYTES + 1)})])
@example(entries=[("bad", {b"event": b"VALID"} | {str(i).encode(): b"" for i in range(5000)})])
@example(entries=[("bad", {b"event": b"NUL"}), ("valid", {b"event": b"VALID", b"attempt": b"5"})])
@example(entries=[("valid", {b"event": b"VALID", b"hold": b"\xe2"})])  # not UTF-8: it stalled
def test_whatever_reaches_the_stream_the_worker_stays_up_and_dead_letters_the_bad(
    fed: Fed, entries: list[tuple[str, dict[bytes, bytes]]]
) -> None:
    ids: list[tuple[str, str, tuple[str, str] | None]] = []  # (kind, entry id, (tenant, id))
    valid = {b"event": encode(new_event("policy.created", "P", data={"title": "t"}))}
    nul = {b"event": encode(new_event("policy.created", "P", data={"title": "t"}))}
    nul[b"event"] = nul[b"event"].replace(b'"t"', b'"t\\u0000"')
    named = {b"VALID": valid[b"event"], b"NUL": nul[b"event"]}
    entries = expand(
        [
            (kind, {k: named.get(v, v) if k == b"event" else v for k, v in f.items()})
            for kind, f in entries
        ]
    )
    pipe = fed.redis.pipeline(transaction=False)
    for _, fields in entries:
        pipe.xadd(fed.keys.events(), fields)  # type: ignore[arg-type]
    added = pipe.execute()
    for (kind, fields), entry_id in zip(entries, added, strict=True):
        try:
            event = json.loads(fields[b"event"])
            identity = (event["tenant"], event["id"])
        except (KeyError, ValueError, TypeError, RecursionError):
            identity = None
        ok = identity is not None and all(isinstance(x, str) for x in identity)
        ids.append((kind, entry_id.decode(), identity if ok else None))
    wait_drained(fed)
    assert fed.alive(), fed.tail()

    letters = dict(
        fed.db.execute(
            "SELECT message_id, error FROM dead_letters WHERE stream = %s", (fed.keys.events(),)
        ).fetchall()
    )
    runs = Counter(fed.db.execute("SELECT tenant, event_id FROM workflow_executions").fetchall())
    assert all(n == 1 for n in runs.values()), runs  # nothing doubled
    for kind, entry_id, event_id in ids:
        dead, executed = entry_id in letters, event_id in runs
        if kind == "bad":
            assert dead, f"{entry_id} was not dead-lettered\n{fed.tail()}"
        elif kind in ("valid", "again"):
            assert executed, f"{entry_id} (event {event_id}) did not run\n{fed.tail()}"
        if kind != "again":  # a second copy of a run event: acknowledged, runs nothing new
            assert dead != executed, (kind, entry_id, event_id)
        if dead:
            assert letters[entry_id].strip(), f"{entry_id} was dead-lettered without a reason"
    # Every execution ended; a dead-lettered one (a NUL in a title, say) says why.
    unfinished = fed.db.execute(
        "SELECT count(*) FROM workflow_executions WHERE status NOT IN ('completed', 'dead_lettered')"
    ).fetchone()
    assert unfinished == (0,)
    unexplained = fed.db.execute(
        "SELECT count(*) FROM workflow_executions e WHERE status = 'dead_lettered' AND NOT EXISTS"
        " (SELECT 1 FROM dead_letters d WHERE d.execution_id = e.id AND d.error <> '')"
    ).fetchone()
    assert unexplained == (0,)


@pytest.mark.slow
def test_a_poison_entry_costs_its_batch_neighbours_nothing(fed: Fed) -> None:
    """Deeply nested JSON next to valid events: only it is dead-lettered, at once."""
    good = [new_event("evidence.created", f"EV-{i}", data={"title": f"E{i}"}) for i in range(20)]
    pipe = fed.redis.pipeline(transaction=False)
    for event in good[:10]:
        pipe.xadd(fed.keys.events(), {"event": encode(event)})
    pipe.xadd(fed.keys.events(), {"event": DEEP})
    for event in good[10:]:
        pipe.xadd(fed.keys.events(), {"event": encode(event)})
    poison_id = pipe.execute()[10].decode()
    wait_drained(fed)

    ((error, attempts),) = fed.db.execute(
        "SELECT error, attempts FROM dead_letters WHERE message_id = %s", (poison_id,)
    ).fetchall()
    assert "nested too deeply" in error
    assert attempts == 1
    # The valid events ran once each, at the first attempt: the poison failed no batch.
    rows = fed.db.execute("SELECT status, attempts FROM workflow_executions").fetchall()
    assert sorted(rows) == [("completed", 1)] * len(good)
    assert fed.db.execute("SELECT count(*) FROM dead_letters").fetchone() == (1,)


# ---------------------------------------------------------------- the command line


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GOVFLOW_")}
    # Unreachable servers: a bad argument must be refused before anything is contacted.
    base.update(
        GOVFLOW_REDIS_URL="redis://127.0.0.1:1/0",
        GOVFLOW_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none",
    )
    return subprocess.run(
        [str(GOVFLOW), *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def definition_files(tmp: Path) -> list[tuple[Path, str]]:
    """(file, what its error must name): files `govflow workflows apply` must refuse."""
    cases = {
        "binary.yaml": (b"\x00\xff\xfe" * 10, "binary.yaml"),
        "deep.yaml": (b"name: x\nwhen: " + b"[" * 5000, "nested too deeply"),
        "unknown-action.yaml": (
            b"name: x\nentity: policy\ntrigger: create\nactions: [{launch_rockets: {}}]\n",
            "launch_rockets",
        ),
        "bad-params.yaml": (
            b"name: x\nentity: policy\ntrigger: create\nactions: [{create_task: {titel: T}}]\n",
            "titel",
        ),
        "not-a-mapping.yaml": (b"- 1\n- 2\n", "not-a-mapping.yaml"),
    }
    out = []
    for name, (content, says) in cases.items():
        (tmp / name).write_bytes(content)
        out.append((tmp / name, says))
    (tmp / "a-directory.yaml").mkdir()
    out.append((tmp / "a-directory.yaml", "a-directory.yaml"))
    return out


def test_bad_definition_files_are_refused_with_status_2(tmp_path: Path) -> None:
    cases = definition_files(tmp_path)
    result = run_cli("workflows", "apply", *(str(path) for path, _ in cases))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == len(cases), result.stderr  # one line per bad file, nothing else
    for line, (path, says) in zip(lines, cases, strict=True):
        assert line.startswith(f"govflow: {path}"), line
        assert says in line


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["publish", "policy.created", "--entity-id", "P1", "--data", DEEP.decode()], "--data"),
        (["publish", "policy.created", "--entity-id", "", "--data", "{}"], "entity_id"),
        (["publish", "policy.created", "--entity-id", "P1", "--id", "i" * 600], "id"),
        (["--log-level", "loud", "schema"], "--log-level"),
        (["run", "--concurrency", "many"], "--concurrency"),
        (["workflows", "apply"], "files"),
    ],
)
def test_bad_arguments_say_why_with_status_2(args: list[str], says: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("govflow: ")
    assert says in line
