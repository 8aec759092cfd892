"""Templates and webhook URLs checked when a definition is applied, before any event."""

from __future__ import annotations

import msgspec
import pytest

from govflow.schemas.codec import decode_workflow
from govflow.schemas.events import new_event
from govflow.schemas.templates import FIELD, check_workflow, path_error, template_errors, url_error

DEFINITION = """\
name: review
entity: policy
trigger: status_change
when: [{{changed: owner}}, {{field: status, equals: pending_approval}}]
actions:
  - {action}
"""


def findings(action: str) -> tuple[list[str], list[str]]:
    found = check_workflow(decode_workflow(DEFINITION.format(action=action)), source="wf.yaml")
    return found.errors, found.warnings


@pytest.mark.parametrize(
    "path",
    ["data.title", "data.a.b.c", "data", "id", "tenant", "entity_id", "actor", "changes",
     "changes.status", "changes.status.from", "changes.status.to", "depth", "causation_id"],
)  # fmt: skip
def test_a_path_into_the_event_passes(path: str) -> None:
    assert path_error(path) is None


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("dta.title", "did you mean 'data'?"),
        ("entity", "did you mean 'entity_id'?"),
        ("Data.title", "'Data' is not a field of the event"),
        ("tenant.name", "'tenant' is a single value"),
        ("changes.status.too", "not 'too'"),
        ("data..title", "an empty part"),
        ("data.", "an empty part"),
    ],
)
def test_a_path_that_reaches_nothing_is_refused(path: str, says: str) -> None:
    assert says in (path_error(path) or "")


@pytest.mark.parametrize(
    "text", ["{ data.title }", "{data-title}", "{}", "Review {data.title", "{data.title and"]
)
def test_a_malformed_field_is_refused(text: str) -> None:
    assert template_errors(text)


@pytest.mark.parametrize(
    "text", ['{"kind": "json"} stays text', "no fields", "{data.title} by {actor}", "a } b"]
)
def test_text_that_is_no_field_stays_text(text: str) -> None:
    assert template_errors(text) == []


def test_the_check_and_render_agree_on_what_a_field_is() -> None:
    from govflow.plugins._api import render

    event = new_event("policy.created", "POL-1", data={"title": "Access"}, actor="ann")
    template = "{data.title} by {actor} ({tenant}) {data.none}"
    assert render(template, event) == "Access by ann (default) "
    assert [m.group(1) for m in FIELD.finditer(template)] == [
        "data.title",
        "actor",
        "tenant",
        "data.none",
    ]


def test_a_field_renders_as_the_events_json_holds_it() -> None:
    from govflow.plugins._api import render

    event = new_event(
        "policy.created", "POL-1", data={"n": 3, "d": {"e": [1, 2]}, "none": None}, actor=None
    )
    as_json = msgspec.json.decode(msgspec.json.encode(event))
    assert render("{occurred_at}", event) == as_json["occurred_at"]  # ISO 8601, as sent
    assert render("{data.n}/{data.d.e}/{data.d}", event) == "3/[1, 2]/{'e': [1, 2]}"
    # Missing, null, a field left out of the JSON, a property that is no field: nothing.
    assert render("[{data.none}{actor}{traceparent}{entity}{data.n.x}{nope}]", event) == "[]"
    assert render("no fields", event) == "no fields"


@pytest.mark.parametrize(
    "url", ["https://hooks.example.org/grc", "http://10.0.0.5:8080/x", "https://{data.host}/x",
            "{data.webhook_url}", "http://hooks:{data.port}/x"],
)  # fmt: skip
def test_a_webhook_url_passes(url: str) -> None:
    assert url_error(url) is None


@pytest.mark.parametrize(
    "url",
    ["not a url", "hooks.example.org/grc", "ftp://example.org/x", "https://", "http://x:port/"],
)
def test_a_webhook_that_is_not_a_url_is_refused(url: str) -> None:
    assert url_error(url) is not None


def test_a_sentence_names_the_file_workflow_action_and_parameter() -> None:
    errors, _ = findings('notify: {webhook: "not a url", message: "{dta.title}"}')
    where = "wf.yaml: workflow review, action 1 (notify), parameter"
    assert errors == [
        f"{where} webhook: 'not a url' is not an http(s) URL with a host",
        (
            f"{where} message: {{dta.title}}: 'dta' is not a field of the event (did you mean"
            " 'data'? fields: id, type, tenant, entity_id, occurred_at, actor, data, changes,"
            " schema_version, depth, causation_id, root_id, traceparent, tracestate)"
        ),
    ]


def test_a_data_name_near_one_the_conditions_name_is_a_warning() -> None:
    errors, warnings = findings('create_task: {title: "{data.title}", assignee: "{data.ownr}"}')
    assert errors == []
    # `title` is named nowhere, so govflow cannot tell; `ownr` is one letter from `owner`.
    assert len(warnings) == 1
    assert "parameter assignee: {data.ownr}" in warnings[0]
    assert "did you mean 'owner'?" in warnings[0]


def test_nested_parameters_are_checked() -> None:
    errors, _ = findings('create_task: {title: "ok", assignee: "{dta.owner}"}')
    assert len(errors) == 1
    assert "parameter assignee" in errors[0]
