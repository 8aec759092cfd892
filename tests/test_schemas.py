"""The wire formats: every malformed input becomes one InvalidEntryError with a reason."""

from __future__ import annotations

import json
import uuid
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from govflow.schemas.codec import (
    MAX_ENTRY_BYTES,
    decode_command,
    decode_event,
    decode_workflow,
    encode,
    json_schemas,
)
from govflow.schemas.commands import RunWorkflow, execution_id
from govflow.schemas.errors import InvalidEntryError
from govflow.schemas.events import Change, convert_event, new_event

EXAMPLE_EVENT: dict[str, Any] = {
    "id": "0b6f6c9e-6a55-4f4e-9d7c-1f0e3f1b2a11",
    "type": "policy.status_changed",
    "tenant": "acme",
    "entity_id": "POL-1042",
    "occurred_at": "2026-11-28T09:30:00Z",
    "actor": "user-17",
    "data": {"title": "Access control", "status": "pending_approval", "risk": "high"},
    "changes": {"status": {"from": "draft", "to": "pending_approval"}},
    "schema_version": 1,
}

EXAMPLE_WORKFLOW = """\
name: high-risk-policy-approval
entity: policy
trigger: status_change
when:
  - field: status
    equals: pending_approval
  - field: risk
    in: [high, critical]
  - changed: owner
actions:
  - create_approval: {approvers: [compliance-officer], due_in_days: 5}
  - create_task: {title: "Review {data.title}", assignee: "{data.owner}"}
  - assign: {assignee: risk-team}
  - notify: {webhook: "https://hooks.example.org/grc", message: "{data.title} needs approval"}
  - change_status: {to: under_review}
"""


def event_json(**changes: Any) -> bytes:
    return json.dumps({**EXAMPLE_EVENT, **changes}).encode()


def reason_of(raw: bytes | str) -> str:
    with pytest.raises(InvalidEntryError) as caught:
        decode_event(raw)
    return caught.value.reason


class TestEvents:
    def test_the_spec_example_decodes(self):
        event = decode_event(event_json())
        assert event.type == "policy.status_changed"
        assert (event.entity, event.change) == ("policy", "status_changed")
        assert event.changes["status"] == Change(from_="draft", to="pending_approval")
        assert event.occurred_at.utcoffset() is not None

    def test_an_event_survives_a_round_trip(self):
        event = new_event(
            "evidence.updated",
            "EV-9",
            tenant="acme",
            data={"file": "report.pdf", "size": 3},
            changes={"file": Change(from_=None, to="report.pdf")},
            actor="user-2",
        )
        wire = encode(event)
        assert b'"from":null' in wire  # the wire name, not the Python one
        assert decode_event(wire) == event
        assert decode_event(wire.decode()) == event

    @pytest.mark.parametrize("raw", [b"{not json", b"", b'{"id": "e1"', b"\xff\xfe"])
    def test_not_json(self, raw):
        assert "not valid JSON" in reason_of(raw)

    def test_json_that_is_not_an_object(self):
        assert "Expected `object`, got `array`" in reason_of(b"[]")

    @pytest.mark.parametrize("field", ["id", "type", "tenant", "entity_id", "occurred_at"])
    def test_missing_field(self, field):
        raw = json.dumps({k: v for k, v in EXAMPLE_EVENT.items() if k != field})
        assert f"missing required field `{field}`" in reason_of(raw)

    @pytest.mark.parametrize(
        ("field", "value", "expected"),
        [
            ("entity_id", 1042, "Expected `str`, got `int` - at `$.entity_id`"),
            ("data", [], "Expected `object`, got `array` - at `$.data`"),
            ("occurred_at", "yesterday", "at `$.occurred_at`"),
            ("changes", {"status": "draft"}, "at `$.changes[...]`"),
            ("schema_version", 2, "at `$.schema_version`"),
            ("id", "", "at `$.id`"),
        ],
    )
    def test_wrong_type(self, field, value, expected):
        assert expected in reason_of(event_json(**{field: value}))

    @pytest.mark.parametrize("kind", ["policy.exploded", "invoice.created", "policy", ""])
    def test_unknown_type(self, kind):
        assert "at `$.type`" in reason_of(event_json(type=kind))

    def test_larger_than_256_kib(self):
        raw = event_json(data={"blob": "x" * MAX_ENTRY_BYTES})
        assert f"over the {MAX_ENTRY_BYTES} byte limit" in reason_of(raw)

    def test_exactly_256_kib_is_still_an_event(self):
        short = event_json(data={"blob": ""})
        raw = event_json(data={"blob": "x" * (MAX_ENTRY_BYTES - len(short))})
        assert len(raw) == MAX_ENTRY_BYTES
        assert len(decode_event(raw).data["blob"]) == MAX_ENTRY_BYTES - len(short)

    def test_unknown_fields_are_ignored_for_forward_compatibility(self):
        assert decode_event(event_json(added_in_v2=True)).id == EXAMPLE_EVENT["id"]

    def test_convert_event_validates_parsed_data(self):
        with pytest.raises(InvalidEntryError, match=r"at `\$.type`"):
            convert_event({**EXAMPLE_EVENT, "type": "nope"})


class TestCommands:
    def test_a_command_survives_a_round_trip(self):
        event = decode_event(event_json())
        command = RunWorkflow(
            execution_id=execution_id(event.tenant, event.id, "wf"),
            workflow_name="wf",
            workflow_version=3,
            event=event,
        )
        wire = encode(command)
        assert json.loads(wire)["command"] == "run"
        assert decode_command(wire) == command

    def test_the_execution_id_is_deterministic(self):
        assert execution_id("acme", "e1", "wf") == execution_id("acme", "e1", "wf")
        assert execution_id("acme", "e1", "wf") != execution_id("acme", "e1", "wf2")

    def test_two_tenants_get_two_execution_ids_and_the_default_keeps_its_old_one(self):
        assert execution_id("acme", "e1", "wf") != execution_id("globex", "e1", "wf")
        assert execution_id("default", "e1", "wf") != execution_id("acme", "e1", "wf")
        # The id every execution had before tenants counted: uuid5(event id, workflow).
        old = uuid.uuid5(uuid.UUID("6c1f7d4e-3b0a-4f2e-9a51-0c9e7f3d2b18"), "e1\x1fwf")
        assert execution_id("default", "e1", "wf") == str(old)

    @settings(max_examples=300, deadline=None)
    @given(tenant=st.text(min_size=1), event_id=st.text(min_size=1), workflow=st.text())
    def test_the_execution_id_is_the_uuid5_of_tenant_event_and_workflow(
        self, tenant: str, event_id: str, workflow: str
    ) -> None:
        namespace = uuid.UUID("6c1f7d4e-3b0a-4f2e-9a51-0c9e7f3d2b18")
        name = f"{event_id}\x1f{workflow}"
        if tenant != "default":
            name = f"{tenant}\x1e{name}"
        assert execution_id(tenant, event_id, workflow) == str(uuid.uuid5(namespace, name))

    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            (b"nope", "not valid JSON"),
            (b'{"command": "explode"}', "Invalid value 'explode'"),
            (b'{"command": "run", "workflow_name": "wf"}', "missing required field"),
        ],
    )
    def test_a_malformed_command_is_refused(self, raw, expected):
        with pytest.raises(InvalidEntryError) as caught:
            decode_command(raw)
        assert expected in caught.value.reason


class TestWorkflows:
    def test_the_spec_example_is_valid(self):
        workflow = decode_workflow(EXAMPLE_WORKFLOW)
        assert workflow.name == "high-risk-policy-approval"
        assert [kind for kind, _ in workflow.steps()] == [
            "create_approval",
            "create_task",
            "assign",
            "notify",
            "change_status",
        ]
        assert workflow.when[1].in_ == ["high", "critical"]
        assert workflow.when[2].changed == "owner"

    def test_json_is_accepted_too(self):
        as_json = json.dumps(msgspec.to_builtins(decode_workflow(EXAMPLE_WORKFLOW)))
        assert decode_workflow(as_json) == decode_workflow(EXAMPLE_WORKFLOW)

    def test_aliases_are_refused_before_they_expand(self):
        # Nine levels of nine aliases: 9**9 strings from a few hundred bytes.
        levels = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
        levels += [f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 9)}]" for n in range(1, 9)]
        bomb = "\n".join(levels) + "\nname: x\nentity: policy\ntrigger: create\n"
        with pytest.raises(InvalidEntryError, match=r"^bomb\.yaml: an alias \(\*name\) at line 2"):
            decode_workflow(bomb, "bomb.yaml")

    def test_bad_yaml_names_the_file_and_line(self):
        with pytest.raises(InvalidEntryError, match=r"^wf\.yaml: not valid YAML at line \d+$"):
            decode_workflow("name: a\nentity: policy\ntrigger: [create\n", "wf.yaml")

    @pytest.mark.parametrize(
        ("yaml_text", "expected"),
        [
            ("- just\n- a list\n", "Expected `object`, got `array`"),
            ("name: a\nentity: policy\ntrigger: create\n", "missing required field `actions`"),
            ("name: a\nentity: policy\ntrigger: create\nactions: []\n", "at `$.actions`"),
            (
                "name: a\nentity: policy\ntrigger: on_save\nactions: [{assign: {}}]\n",
                "Invalid enum value 'on_save' - at `$.trigger`",
            ),
            (
                "name: a\nentity: invoice\ntrigger: create\nactions: [{assign: {}}]\n",
                "at `$.entity`",
            ),
            (
                "name: Bad Name\nentity: policy\ntrigger: create\nactions: [{assign: {}}]\n",
                "at `$.name`",
            ),
            (
                "name: a\nentity: policy\ntrigger: create\nactions: [{assign: {}, notify: {}}]\n",
                "action 1 must name exactly one action type",
            ),
            (
                "name: a\nentity: policy\ntrigger: create\nactionz: []\nactions: [{assign: {}}]\n",
                "unknown field `actionz`",
            ),
        ],
    )
    def test_an_invalid_definition_is_refused_with_a_reason(self, yaml_text, expected):
        with pytest.raises(InvalidEntryError) as caught:
            decode_workflow(yaml_text, "wf.yaml")
        assert caught.value.reason.startswith("wf.yaml: ")
        assert expected in caught.value.reason

    @pytest.mark.parametrize(
        ("condition", "expected"),
        [
            ("{field: status}", "needs exactly one of `equals`, `in`"),
            ("{field: status, equals: a, in: [b]}", "needs exactly one of `equals`, `in`"),
            ("{changed: owner, field: status}", "either `changed` or `field`"),
            ("{}", "needs `field`"),
            ("{field: status, matches: a}", "unknown field `matches`"),
            ("{field: status, in: high}", "Expected `array | null`, got `str`"),
        ],
    )
    def test_a_bad_condition_is_refused(self, condition, expected):
        text = f"name: a\nentity: policy\ntrigger: create\nwhen: [{condition}]\nactions: [{{assign: {{}}}}]\n"
        with pytest.raises(InvalidEntryError, match=r"at `\$\.when\[0\]") as caught:
            decode_workflow(text)
        assert expected in caught.value.reason


class TestJsonSchema:
    def test_every_wire_format_has_a_schema(self):
        schemas = json_schemas()
        assert schemas["$schema"].endswith("2020-12/schema")
        assert set(schemas) >= {"event", "command", "workflow", "$defs"}
        json.dumps(schemas)  # plain JSON all the way down

    def test_the_event_schema_requires_what_spec_requires(self):
        defs = json_schemas()["$defs"]
        event = defs["Event"]
        assert set(event["required"]) == {"id", "type", "tenant", "entity_id", "occurred_at"}
        assert "policy.status_changed" in event["properties"]["type"]["enum"]
        assert len(event["properties"]["type"]["enum"]) == 12

    def test_the_workflow_schema_lists_triggers(self):
        workflow = json_schemas()["$defs"]["Workflow"]
        assert set(workflow["properties"]["trigger"]["enum"]) == {
            "create",
            "update",
            "status_change",
            "delete",
        }
        assert "actions" in workflow["required"]


class TestStepTimeouts:
    """A step's own ``timeout:``: read by govflow, not passed to the action, in the schema."""

    DEFINITION = """
name: timed
entity: policy
trigger: create
actions:
  - notify: {webhook: "https://hooks.example.org/x", timeout: TIMEOUT}
  - create_task: {title: t}
"""

    @pytest.mark.parametrize(
        ("written", "seconds"), [("30s", 30.0), ("1.5m", 90.0), ("250ms", 0.25), ("2", 2.0)]
    )
    def test_a_step_timeout_is_a_duration(self, written: str, seconds: float) -> None:
        wf = decode_workflow(self.DEFINITION.replace("TIMEOUT", written))
        assert [s.timeout for s in wf.specs()] == [seconds, None]
        assert wf.steps()[0] == ("notify", {"webhook": "https://hooks.example.org/x"})

    @pytest.mark.parametrize("written", ["soon", "-5s", "0", "true"])
    def test_a_bad_step_timeout_is_refused(self, written: str) -> None:
        with pytest.raises(InvalidEntryError, match="action 1: timeout"):
            decode_workflow(self.DEFINITION.replace("TIMEOUT", written))

    def test_the_schema_shows_the_step_timeout(self) -> None:
        actions = json_schemas()["$defs"]["Workflow"]["properties"]["actions"]
        timeout = actions["items"]["additionalProperties"]["properties"]["timeout"]
        assert {"type": "string", "pattern": r"^\d+(\.\d+)?(ms|s|m|h|d)?$"} in timeout["anyOf"]
