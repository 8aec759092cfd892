"""The steps of an execution's detail: which are still to come and which will never run.

``step_details`` reads the definition's steps, the rows written and the outcome of each
wait; these cases cover every way a step without a row can stand.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from govflow.db.detail import step_details
from govflow.db.executions import Step
from govflow.schemas.codec import decode_workflow

APPROVAL = """
name: policy-approval
entity: policy
trigger: create
actions:
  - create_approval:
      approvers: [ciso]
      wait: true
      on_approved: [{assign: {assignee: publisher}}]
      on_rejected: [{create_task: {title: Rework}}, {assign: {assignee: owner}}]
  - create_task: {title: Publish}
"""
SPECS = decode_workflow(APPROVAL, "test").specs()
CREATED = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def done(step: int, action: str, after_s: float) -> Step:
    return Step(
        step=step,
        action=action,
        status="completed",
        attempts=1,
        error=None,
        updated_at=CREATED + timedelta(seconds=after_s),
    )


def statuses(rows: list[Step], outcome: str, status: str) -> list[tuple[int, str]]:
    return [(s.step, s.status) for s in step_details(SPECS, rows, {1: outcome}, CREATED, status)]


def test_while_the_approval_is_pending_everything_after_it_is_to_come() -> None:
    details = step_details(
        SPECS, [done(1, "create_approval", 0.5)], {1: "pending"}, CREATED, "waiting"
    )
    assert [(s.step, s.action, s.status) for s in details] == [
        (1, "create_approval", "completed"),
        (2, "create_task", "pending"),
        (3, "assign", "pending"),
        (4, "create_task", "pending"),
        (5, "assign", "pending"),
    ]
    assert [(s.branch_of, s.branch) for s in details] == [
        (None, None),
        (None, None),
        (1, "approved"),
        (1, "rejected"),
        (1, "rejected"),
    ]
    assert (details[0].wait, details[0].after_s, details[0].attempts) == (True, 0.5, 1)
    assert (details[1].updated_at, details[1].after_s, details[1].attempts) == (None, None, 0)


def test_once_approved_the_rejection_branch_is_skipped() -> None:
    rows = [done(1, "create_approval", 1), done(3, "assign", 90)]
    assert statuses(rows, "approved", "running") == [
        (1, "completed"),
        (2, "pending"),
        (3, "completed"),
        (4, "skipped"),
        (5, "skipped"),
    ]


def test_once_rejected_and_ended_every_step_not_run_is_skipped() -> None:
    rows = [done(1, "create_approval", 1), done(4, "create_task", 60), done(5, "assign", 61)]
    assert statuses(rows, "rejected", "completed") == [
        (1, "completed"),
        (2, "skipped"),
        (3, "skipped"),
        (4, "completed"),
        (5, "completed"),
    ]
