"""``!tools``: the tools personas may call; ``!approve`` / ``!deny``: answer an approval."""

from __future__ import annotations

from ..personas.tools import Approvals, ToolRegistry
from ..personas.tools.toolbox import Toolbox
from .base import CommandContext, CommandTable
from .parser import CommandSpec, ParsedCommand


class ToolCommands:
    def __init__(self, toolbox: Toolbox) -> None:
        self.toolbox = toolbox

    @property
    def registry(self) -> ToolRegistry:
        return self.toolbox.registry

    @property
    def approvals(self) -> Approvals:
        return self.toolbox.approvals

    def register(self, table: CommandTable) -> None:
        table.add(CommandSpec("tools", "tools", "the tools personas can use"), self.tools)
        table.add(
            CommandSpec(
                "approve", "approve", "let a persona run the tool waiting here", min_role="trusted"
            ),
            self.answer,
        )
        table.add(
            CommandSpec("deny", "deny", "refuse the tool waiting here", min_role="trusted"),
            self.answer,
        )

    async def tools(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        cfg = self.toolbox.config
        lines = ["Tools:"]
        for tool in self.registry.all():
            flags = " (needs approval)" if tool.side_effects else ""
            lines.append(f"• {tool.name}{flags}: {tool.description}")
        default = ", ".join(cfg.default) or "none"
        lines.append(
            f"Personas without a list of their own have: {default}. "
            f"Give one some with {ctx.prefix}persona set <name> tools a,b; "
            f"at most {cfg.max_hops} rounds of tools per reply."
        )
        await ctx.reply("\n".join(lines))

    async def answer(self, ctx: CommandContext, cmd: ParsedCommand) -> None:
        """Decided when the message arrived (a waiting reply holds the room's queue);
        this says what it decided."""
        outcome = self.approvals.outcome_of(ctx.event_id)
        await ctx.reply(outcome or "Nothing here is waiting for approval.")
