"""``govflow publish --wait``: the executions an event caused, or the nearest miss and why."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from govflow.cli.outcome import Caused, NearestMiss, Outcome, lines, matched
from govflow.consumers.matching import explain
from govflow.runtime.worker import Worker
from govflow.schemas.codec import decode_workflow
from govflow.schemas.events import Change, new_event
from govflow.schemas.settings import Settings
from govflow.schemas.workflows import StoredWorkflow
from tests.ops_helpers import govflow, govflow_env
from tests.test_cli import EXAMPLES

APPROVAL_FILE = next(path for path in EXAMPLES if path.stem == "high-risk-policy-approval")
APPROVAL = decode_workflow(APPROVAL_FILE.read_text())
REVIEW = """\
name: review
entity: policy
trigger: create
actions:
  - create_task: {title: "Review {data.title}"}
  - assign: {assignee: risk-team}
"""


def approval_event(**changes: Change) -> Any:
    return new_event(
        "policy.status_changed",
        "POL-1",
        data={"title": "Access", "status": "pending_approval", "risk": "high"},
        changes={"status": Change("draft", "pending_approval"), **changes},
    )


def test_explain_says_what_did_not_hold() -> None:
    assert explain(APPROVAL, approval_event(owner=Change("ann", "bob"))) is None
    miss = explain(APPROVAL, approval_event())
    assert miss is not None
    assert miss.reason == (
        "trigger status_change matched, but `changed: owner` did not hold"
        " (the event changed status)"
    )
    low = new_event("policy.status_changed", "P", data={"status": "draft"})
    assert (explain(APPROVAL, low) or miss).reason == (
        'trigger status_change matched, but `status equals "pending_approval"` did not hold'
        ' (it is "draft"); nor did 2 more'
    )
    other = explain(APPROVAL, new_event("policy.created", "P"))
    assert other is not None
    assert other.reason == "its trigger is status_change, and the event is a create"
    assert explain(APPROVAL, new_event("evidence.created", "E")) is not None


def test_the_nearest_miss_is_the_one_that_got_furthest() -> None:
    stored = [
        StoredWorkflow(name="review", version=1, definition=decode_workflow(REVIEW)),
        StoredWorkflow(name=APPROVAL.name, version=3, definition=APPROVAL),
    ]
    hits, miss = matched(stored, approval_event())
    assert hits == []
    assert miss is not None
    assert miss.workflow == APPROVAL.name
    assert matched([], approval_event()) == ([], None)
    hits, miss = matched(stored, approval_event(owner=Change("ann", "bob")))
    assert ([h.name for h in hits], miss) == ([APPROVAL.name], None)


def test_the_lines_a_person_reads() -> None:
    caused = Outcome(
        event_id="ev-1",
        executions=[
            Caused(workflow="a", version=2, execution_id="3f2a1b7c-x", status="completed"),
            Caused(workflow="b", version=1, execution_id="9", status=None),
        ],
    )
    assert lines(caused, 10) == [
        "a v2: completed, execution 3f2a1b7c",
        "b v1: not started within 10s (is `govflow run` running?)",
    ]
    missed = Outcome(
        event_id="ev-2",
        executions=[],
        nearest_miss=NearestMiss(workflow="a", reason="it is for evidence events"),
        enabled_workflows=2,
    )
    assert lines(missed, 10) == [
        "matched no workflow (of 2 enabled); nearest miss:",
        "  a: it is for evidence events",
    ]
    assert "none is enabled" in lines(Outcome(event_id="ev-3", executions=[]), 10)[0]


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[None]:
    """The trigger matcher and action workers, in this process, until the block ends."""
    worker = Worker(settings, frozenset({"triggers", "actions"}))
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        try:
            yield
        finally:
            worker.stop()


@pytest.mark.anyio
@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_publish_wait(
    redis_server_url: str,
    database_url: str,
    prefix: str,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    env = govflow_env(redis_server_url, database_url, prefix)
    review = tmp_path / "review.yaml"
    review.write_text(REVIEW)
    applied = await govflow(env, "workflows", "apply", str(APPROVAL_FILE), str(review))
    assert applied.returncode == 0, applied.stderr
    data = '{"title": "Access", "status": "pending_approval", "risk": "high"}'
    status = '{"status": {"from": "draft", "to": "pending_approval"}}'

    async with running(make_settings()):
        created = await govflow(
            env, "publish", "policy.created", "--entity-id", "P-1", "--id", "ev-1", "--wait"
        )
        missed = await govflow(
            env, "publish", "policy.status_changed", "--entity-id", "P-1", "--id", "ev-2",
            "--data", data, "--changes", status, "--wait",
        )  # fmt: skip
    quiet = await govflow(env, "publish", "policy.created", "--entity-id", "P-2", "--id", "ev-3")
    stalled = await govflow(
        env, "publish", "policy.created", "--entity-id", "P-3", "--wait", "--wait-timeout", "0.5"
    )

    assert created.returncode == 0, created.stderr
    ev1, line = created.stdout.decode().splitlines()
    assert ev1 == "ev-1"
    assert line.startswith("review v1: completed, execution ")
    assert missed.returncode == 0, missed.stderr
    assert missed.stdout.decode().splitlines() == [
        "ev-2",
        "matched no workflow (of 2 enabled); nearest miss:",
        (
            "  high-risk-policy-approval: trigger status_change matched, but `changed: owner`"
            " did not hold (the event changed status)"
        ),
    ]
    assert quiet.stdout == b"ev-3\n"  # without --wait: the id, and nothing else
    assert stalled.returncode == 0, stalled.stderr
    assert stalled.stdout.decode().splitlines()[1] == (
        "review v1: not started within 0.5s (is `govflow run` running?)"
    )
