"""Tools a persona may call: a typed registry, the runner, approvals, the built-in tools."""

from .approvals import Approvals, Verdict
from .registry import Tool, ToolContext, ToolError, ToolRegistry
from .runner import ToolResult, ToolRunner

__all__ = [
    "Approvals",
    "Tool",
    "ToolContext",
    "ToolError",
    "ToolRegistry",
    "ToolResult",
    "ToolRunner",
    "Verdict",
]
