"""Conversation memory and live replies, as pure functions.

No I/O here: the caller loads turns from the database, counts tokens with the
model's tokenizer and talks to Matrix; these modules decide what goes into a
prompt (:mod:`.context`), how a reply looks on Matrix (:mod:`.formatting`) and
when a streamed reply is edited (:mod:`.streaming`).
"""

from hivebridge.conversation.context import (
    Prompt,
    SummaryRequest,
    ToolUse,
    Turn,
    apply_reset,
    build_prompt,
    build_summary_request,
    rollback,
    select_turns,
    summary_due,
)
from hivebridge.conversation.formatting import (
    markdown_to_html,
    reply_pieces,
    split_message,
    strip_think,
)
from hivebridge.conversation.persona import persona_system_prompt, render_traits
from hivebridge.conversation.streaming import EditThrottle, StreamAction, stable_prefix

__all__ = [
    "EditThrottle",
    "Prompt",
    "StreamAction",
    "SummaryRequest",
    "ToolUse",
    "Turn",
    "apply_reset",
    "build_prompt",
    "build_summary_request",
    "markdown_to_html",
    "persona_system_prompt",
    "render_traits",
    "reply_pieces",
    "rollback",
    "select_turns",
    "split_message",
    "stable_prefix",
    "strip_think",
    "summary_due",
]
