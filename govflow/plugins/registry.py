"""Which actions are installed: every entry point in the group ``govflow.actions``.

govflow's own five actions are entry points of the ``govflow`` distribution, listed in
its pyproject; a plug-in package lists its own the same way (see docs/plugins.md)::

    [project.entry-points."govflow.actions"]
    send_sms = "acme_sms.actions:send_sms"
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from govflow.plugins._api import ActionType
from govflow.schemas.errors import ConfigError, InvalidEntryError

ENTRY_POINT_GROUP = "govflow.actions"


class PluginError(ConfigError):
    """An installed action fails to load, is not an action, or takes a name already taken."""


@cache
def registry() -> dict[str, ActionType[Any]]:
    """Every installed action, by name, loaded once per process.

    Raises:
        PluginError: an entry point fails to load, names no action, or names one twice.
    """
    found: dict[str, tuple[ActionType[Any], EntryPoint]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        loaded = _load(ep)
        if (earlier := found.get(loaded.name)) is not None and earlier[0] is not loaded:
            raise PluginError(
                f"action {loaded.name!r} is installed twice, by {_origin(earlier[1])} and by"
                f" {_origin(ep)}: uninstall one of them"
            )
        found[loaded.name] = (loaded, ep)
    return {name: loaded for name, (loaded, _) in found.items()}


def _load(ep: EntryPoint) -> ActionType[Any]:
    """Import what the entry point names and check that it is the action it is named for."""
    try:
        loaded = ep.load()
    except Exception as e:  # a plug-in's import can raise anything: say which
        raise PluginError(
            f"action plug-in {_origin(ep)} failed to load: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(loaded, ActionType):
        raise PluginError(
            f"action plug-in {_origin(ep)} is not an action: decorate it with"
            " @govflow.plugins.action"
        )
    if loaded.name != ep.name:
        raise PluginError(
            f"action plug-in {_origin(ep)} is the action {loaded.name!r}: the entry point"
            " and the action must have the same name"
        )
    return loaded


def _origin(ep: EntryPoint) -> str:
    """``name = module:attr`` and the distribution that declares it."""
    where = f" (package {ep.dist.name})" if ep.dist is not None else ""
    return f"{ep.name} = {ep.value}{where}"


def check_actions(steps: list[tuple[str, dict[str, Any]]], source: str = "definition") -> None:
    """Check that every step names a known action with valid parameters.

    Raises:
        InvalidEntryError: an unknown action or bad parameters.
        PluginError: an installed action fails to load.
    """
    known = registry()
    for number, (name, params) in enumerate(steps, start=1):
        if name not in known:
            raise InvalidEntryError(
                f"{source}: action {number} is {name!r}, not one of {', '.join(sorted(known))}"
            )
        try:
            known[name].parse(params)
        except InvalidEntryError as e:
            raise InvalidEntryError(f"{source}: action {number}: {e.reason}") from e
