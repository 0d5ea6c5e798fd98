"""Checking a call's arguments against its tool's JSON schema (the subset tools use).

A grammar already keeps the local engine's calls valid; a remote model, or a
call parsed from text, may send anything. Supported: ``type`` (object, string,
integer, number, boolean, array), ``properties``, ``required``,
``additionalProperties: false``, ``enum``, ``minimum``/``maximum``,
``minLength``/``maxLength``, ``items``. The answer is one line the model can act on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
}


def check_arguments(schema: Mapping[str, Any], value: Any, where: str = "arguments") -> str | None:
    """None when ``value`` matches ``schema``, else what is wrong, in a few words."""
    kind = schema.get("type")
    if isinstance(kind, str) and kind in _TYPES:
        ok = isinstance(value, _TYPES[kind])
        if kind in ("integer", "number") and isinstance(value, bool):
            ok = False
        if kind == "integer" and isinstance(value, float) and value.is_integer():
            ok = True
        if not ok:
            return f"{where} must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {', '.join(map(str, schema['enum']))}"
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            return f"{where} is longer than {schema['maxLength']} characters"
        if "minLength" in schema and len(value) < schema["minLength"]:
            return f"{where} is shorter than {schema['minLength']} characters"
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            return f"{where} must be at least {schema['minimum']}"
        if "maximum" in schema and value > schema["maximum"]:
            return f"{where} must be at most {schema['maximum']}"
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", ()):
            if name not in value:
                return f"{name} is required"
        if schema.get("additionalProperties") is False:
            extra = [k for k in value if k not in props]
            if extra:
                return f"unknown argument {extra[0]!r}"
        for name, sub in props.items():
            if name in value and isinstance(sub, Mapping):
                problem = check_arguments(sub, value[name], name)
                if problem:
                    return problem
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            problem = check_arguments(schema["items"], item, f"{where}[{i}]")
            if problem:
                return problem
    return None
