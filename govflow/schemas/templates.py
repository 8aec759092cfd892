"""Check a definition's ``{data.title}``-style templates and webhook URLs before it runs.

An action renders ``{dotted.path}`` from the event, and a path that leads nowhere renders
as an empty string, at run time, for every event. So ``govflow workflows apply`` refuses:

- a path whose first part is not a field of the event (``{dta.title}``, ``{entity}``);
- a path under a field that has no parts (``{tenant.name}``), or under ``changes`` that
  names neither ``from`` nor ``to`` (``{changes.status.too}``);
- a field written almost right: ``{ data.title }``, ``{data..title}``, ``{data.title``;
- a ``webhook`` parameter that is not an http(s) URL with a host (a template in it stands
  for any text, so ``https://{data.host}/hook`` passes and ``{data.hook_url}`` is not checked).

What ``data`` holds is up to the service that publishes, so a path under ``data`` is never
an error. It is a warning when its first name is not one the definition's ``when`` names
but is close to one (``{data.ownr}`` beside ``changed: owner``): a likely typo, but only
the events can tell.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import msgspec

from govflow.schemas.events import Event
from govflow.schemas.workflows import Workflow

# The fields an action fills in; the actions' ``render`` (govflow.plugins) uses this pattern.
FIELD = re.compile(r"\{([A-Za-z_][\w.]*)\}")
# Braces around something that reads like a path, but is not one: ``{ data.title }``,
# ``{data..title}``, ``{}``. Braces around anything else (JSON, say) are text.
_NEAR_FIELD = re.compile(r"\{\s*[\w.\-\s]*\}")
# A path opened and never closed: ``{data.title`` at the end or before a space.
_UNCLOSED = re.compile(r"\{[A-Za-z_][\w.]*(?![\w.}])")

# The event as an action sees it: its fields under their JSON names.
ROOTS: tuple[str, ...] = tuple(f.encode_name for f in msgspec.structs.fields(Event))
_NESTED_ROOTS = frozenset({"data", "changes"})
_CHANGE_PARTS = frozenset({"from", "to"})
_URL_PARAMETERS = frozenset({"webhook"})


class Findings(msgspec.Struct, kw_only=True):
    """What the check found: errors refuse the definition, warnings only say so."""

    errors: list[str] = msgspec.field(default_factory=list)
    warnings: list[str] = msgspec.field(default_factory=list)


def check_workflow(workflow: Workflow, source: str = "definition") -> Findings:
    """Check every template and webhook URL in the actions of ``workflow``.

    Args:
        workflow: a decoded definition (its action types are checked elsewhere).
        source: what to name in each sentence, the file usually.
    """
    findings = Findings()
    known = _data_names(workflow)
    for number, (action, params) in enumerate(workflow.steps(), start=1):
        where = f"{source}: workflow {workflow.name}, action {number} ({action})"
        for parameter, text in _strings(params):
            at = f"{where}, parameter {parameter}"
            findings.errors.extend(f"{at}: {problem}" for problem in template_errors(text))
            is_url = parameter.rpartition(".")[2] in _URL_PARAMETERS
            if is_url and (problem := url_error(text)) is not None:
                findings.errors.append(f"{at}: {problem}")
            findings.warnings.extend(f"{at}: {hint}" for hint in _data_hints(text, known))
    return findings


def template_errors(text: str) -> list[str]:
    """What is wrong with the ``{...}`` fields of ``text``; empty when nothing is."""
    problems = [
        f"{match.group()!r} is not a field: write a dotted path, e.g. {{data.title}}"
        for match in _NEAR_FIELD.finditer(text)
        if not FIELD.fullmatch(match.group())
    ]
    problems.extend(f"{m.group()!r} is not closed with '}}'" for m in _UNCLOSED.finditer(text))
    problems.extend(
        f"{{{m.group(1)}}}: {problem}"
        for m in FIELD.finditer(text)
        if (problem := path_error(m.group(1))) is not None
    )
    return problems


def path_error(path: str) -> str | None:
    """Why ``path`` can never reach a value of an event, or ``None`` when it may."""
    parts = path.split(".")
    if any(not part for part in parts):
        return "an empty part between dots"
    root = parts[0]
    if root not in ROOTS:
        near = difflib.get_close_matches(root, ROOTS, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        return f"{root!r} is not a field of the event ({hint}fields: {', '.join(ROOTS)})"
    if len(parts) > 1 and root not in _NESTED_ROOTS:
        return f"{root!r} is a single value, with no {parts[1]!r} inside"
    if root == "changes" and len(parts) > 2 and parts[2] not in _CHANGE_PARTS:
        return f"a change has 'from' and 'to', not {parts[2]!r}"
    return None


def url_error(text: str) -> str | None:
    """Why ``text`` is not a webhook URL, or ``None`` when it is (or a template decides)."""
    if FIELD.match(text):
        return None  # the event supplies the whole URL, scheme and all
    filled = FIELD.sub("0", text)  # "0": a valid host, port or path part alike
    try:
        parts = urlsplit(filled)
        host = parts.hostname
        _ = parts.port
    except ValueError as e:  # a bad port or IPv6 literal
        return f"{text!r} is not a URL ({e})"
    if parts.scheme not in ("http", "https") or not host:
        return f"{text!r} is not an http(s) URL with a host"
    return None


def _strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every string in an action's parameters, with its dotted parameter name."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{path}[{index}]")


def _data_names(workflow: Workflow) -> frozenset[str]:
    """The names of ``data`` the definition's ``when`` says an event carries."""
    names: set[str] = set()
    for condition in workflow.when:
        if condition.field:
            names.add(condition.field.split(".")[0])
        if condition.changed:
            names.add(condition.changed.split(".")[0])
    return frozenset(names)


def _data_hints(text: str, known: frozenset[str]) -> Iterator[str]:
    for match in FIELD.finditer(text):
        parts = match.group(1).split(".")
        if parts[0] != "data" or len(parts) < 2 or parts[1] in known:
            continue
        near = difflib.get_close_matches(parts[1], known, n=1, cutoff=0.75)
        if near:
            yield (
                f"{{{match.group(1)}}}: no `when` condition names {parts[1]!r}; did you mean"
                f" {near[0]!r}? (left as it is: the events decide)"
            )
