"""Running one tool call: never raises, always answers the model.

The call is checked (a tool the persona has, arguments that match its
schema), approved when the tool has side effects, run under its timeout, and
counted (calls by outcome, latency, per tool). Whatever goes wrong becomes an
``error: …`` result the model sees and the reply goes on; the details of an
unexpected failure go to the log, never into the room or the prompt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Literal

from ... import metrics
from ...inference.types import ToolCall
from .approvals import Approvals
from .registry import Tool, ToolContext, ToolError, ToolRegistry
from .schema import check_arguments

log = logging.getLogger("hivebridge.tools")

Outcome = Literal["ok", "error", "timeout", "invalid", "unknown", "denied"]


@dataclass(frozen=True, slots=True)
class ToolResult:
    call: ToolCall
    content: str  # what the model is shown
    outcome: Outcome
    duration_s: float
    hop: int = 0
    note: str = ""  # what the model said along with the call

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


class ToolRunner:
    def __init__(
        self,
        registry: ToolRegistry,
        approvals: Approvals,
        *,
        timeout_s: float = 10.0,
        approval_timeout_s: float = 120.0,
        max_result_chars: int = 1500,
    ) -> None:
        self.registry = registry
        self.approvals = approvals
        self.timeout_s = timeout_s
        self.approval_timeout_s = approval_timeout_s
        self.max_result_chars = max_result_chars

    async def run(
        self,
        call: ToolCall,
        ctx: ToolContext,
        allowed: Collection[str],
        *,
        post: Callable[[str], Awaitable[str]] | None = None,
        hop: int = 0,
        note: str = "",
    ) -> ToolResult:
        """Run ``call`` for ``ctx``; ``post`` sends a notice to the room (approvals)."""
        started = time.monotonic()
        tool = self.registry.get(call.name) if call.name in allowed else None
        if tool is None:
            outcome: Outcome = "unknown"
            content = f"error: there is no tool named {call.name[:48]!r} here"
        else:
            outcome, content = await self._run(tool, call, ctx, post)
        if len(content) > self.max_result_chars:
            content = content[: self.max_result_chars - 1] + "…"
        duration = time.monotonic() - started
        label = metrics.bounded(call.name, set(self.registry.names()))
        metrics.TOOL_CALLS.labels(label, outcome).inc()
        if tool is not None:
            metrics.TOOL_DURATION.labels(label).observe(duration)
        log.info(
            "tool %s: %s in %.2fs",
            call.name[:48],
            outcome,
            duration,
            extra={"room_id": ctx.room_id, "persona": ctx.persona},
        )
        return ToolResult(call, content, outcome, duration, hop, note)

    async def _run(
        self,
        tool: Tool,
        call: ToolCall,
        ctx: ToolContext,
        post: Callable[[str], Awaitable[str]] | None,
    ) -> tuple[Outcome, str]:
        problem = check_arguments(tool.parameters, dict(call.arguments))
        if problem:
            return "invalid", f"error: {problem}"
        if tool.side_effects:
            if post is None:
                return "denied", "error: this tool needs an approval, and none can be asked here"
            verdict = await self.approvals.request(
                ctx.room_id, tool.describe(call.arguments), post, self.approval_timeout_s
            )
            if verdict.decision != "approved":
                why = "nobody approved it in time" if verdict.decision == "timeout" else "denied"
                return "denied", f"error: the call was not run ({why})"
        timeout = tool.timeout_s if tool.timeout_s is not None else self.timeout_s
        try:
            result = await asyncio.wait_for(tool.run(call.arguments, ctx), timeout)
        except ToolError as e:
            return "error", f"error: {e}"
        except TimeoutError:
            return "timeout", f"error: {tool.name} took longer than {timeout:g}s"
        except Exception as e:
            log.warning("tool %s failed", tool.name, exc_info=True, extra={"room_id": ctx.room_id})
            return "error", f"error: {tool.name} failed ({type(e).__name__})"
        return "ok", str(result).strip() or "(no result)"
