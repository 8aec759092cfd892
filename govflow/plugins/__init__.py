"""The action plug-in API: declare an action, read its step, queue its effects.

A package adds an action with ``@action`` and an entry point in the group
``govflow.actions`` (docs/plugins.md)::

    from govflow.plugins import PermanentError, StepContext, action

    @action("send_sms")
    async def send_sms(ctx: StepContext, params: SmsParams) -> None: ...

Any exception other than ``PermanentError`` means "try the step again later";
``RetryLater(seconds)`` says when.
"""

from govflow.db.batch import Batched
from govflow.plugins._api import ActionType, Effects, StepContext, action
from govflow.plugins.registry import PluginError
from govflow.schemas.errors import PermanentError, RetryLater

__all__ = [
    "ActionType",
    "Batched",
    "Effects",
    "PermanentError",
    "PluginError",
    "RetryLater",
    "StepContext",
    "action",
]
