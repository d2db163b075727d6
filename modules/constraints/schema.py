"""Static checks of a JSON schema before anything compiles it: its size and shape and the contradictions a
metaschema cannot see (minimum greater than maximum...), then its validity as JSON Schema (the `jsonschema`
library's metaschema check).

The walk is a loop over an explicit stack, so a schema nested far deeper than any limit is measured, and
refused, without recursing; only once depth and size are known to be small do recursive tools (json.dumps,
jsonschema) see it.
"""
from __future__ import annotations

import json
import math
from typing import Any

from modules.constraints import limits
from modules.constraints.scan import Measure, scan
from modules.errors import ConstraintError

WHAT = "json_schema"

#: Keywords whose value is one subschema (or, for items in older drafts, a list of them).
_ONE_SCHEMA = frozenset({"additionalProperties", "items", "additionalItems", "contains", "propertyNames", "not",
                         "if", "then", "else", "unevaluatedItems", "unevaluatedProperties", "contentSchema"})
#: Keywords whose value is a list of subschemas.
_SCHEMA_LIST = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
#: Keywords whose value maps names to subschemas (`dependencies` maps to a schema or a list of names).
_SCHEMA_MAP = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas",
                         "dependencies"})
#: Counts a compiler writes out as that many copies of an item.
_ITEM_KEYWORDS = ("minItems", "maxItems", "minProperties", "maxProperties", "minContains", "maxContains")
_TYPES = ("array", "boolean", "integer", "null", "number", "object", "string")
#: (lower, upper, strict): lower must not exceed upper (or reach it, when strict).
_PAIRS = (("minimum", "maximum", False), ("exclusiveMinimum", "exclusiveMaximum", True),
          ("minimum", "exclusiveMaximum", True), ("exclusiveMinimum", "maximum", True),
          ("minLength", "maxLength", False), ("minItems", "maxItems", False),
          ("minProperties", "maxProperties", False), ("minContains", "maxContains", False))


class _Walk:
    """Totals over one schema."""

    def __init__(self) -> None:
        self.nodes = 1  # the schema itself; each container adds its elements before they go on the stack
        self.chars = 0
        self.properties = 0
        self.enum_values = 0
        self.items = 0
        self.string_bounds: set[tuple[float | int | None, float | int | None]] = set()  # (maxLength, minLength)
        self.text = Measure()  # text repetitions: string lengths and the patterns' {m,n}

    def count(self, values: int) -> None:
        self.nodes += values
        if self.nodes > limits.MAX_SCHEMA_NODES:
            raise ConstraintError(f"{WHAT}: more than the limit of {limits.MAX_SCHEMA_NODES} values.")


def schema_text(schema: Any) -> str:
    """The schema as compact JSON: the text every compiler and cache sees. Only for a schema check_bounds
    passed (json.dumps recurses)."""
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


def check_bounds(schema: Any) -> None:
    """Size, nesting, counts and contradictions, in one loop over the schema (no recursion)."""
    walk = _Walk()
    # (value, depth, is a schema, path link); a path link is (key, parent link), turned into text only for errors
    stack: list[tuple[Any, int, bool, tuple | None]] = [(schema, 1, True, None)]
    while stack:
        value, depth, is_schema, link = stack.pop()
        if isinstance(value, (dict, list, tuple)):
            if depth > limits.MAX_NESTING_DEPTH:
                raise ConstraintError(f"{WHAT}: nesting deeper than the limit of {limits.MAX_NESTING_DEPTH} levels "
                                      f"(at {_path(link)}).")
            walk.count(len(value))
        if isinstance(value, dict):
            if is_schema:
                _check_keywords(value, link, walk)
            for key, child in value.items():
                if not isinstance(key, str):
                    raise ConstraintError(f"{WHAT}: a key that is not a string ({key!r}) at {_path(link)}.")
                walk.chars += len(key) + 4
                child_link = (key, link)
                if is_schema and key in _SCHEMA_MAP and isinstance(child, dict):
                    walk.count(len(child))
                    stack.extend((sub, depth + 2, True, (name, child_link)) for name, sub in child.items())
                    walk.chars += sum(len(name) + 4 for name in child)
                elif is_schema and (key in _SCHEMA_LIST or key == "items") and isinstance(child, (list, tuple)):
                    walk.count(len(child))
                    stack.extend((sub, depth + 2, True, (index, child_link)) for index, sub in enumerate(child))
                else:
                    stack.append((child, depth + 1, is_schema and key in _ONE_SCHEMA, child_link))
        elif isinstance(value, (list, tuple)):
            stack.extend((item, depth + 1, False, (index, link)) for index, item in enumerate(value))
        elif isinstance(value, str):
            walk.chars += len(value) + 2
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConstraintError(f"{WHAT}: {value} at {_path(link)} is not a JSON number.")
        elif value is not None and not isinstance(value, (bool, int, float)):
            raise ConstraintError(f"{WHAT}: a {type(value).__name__} at {_path(link)} is not a JSON value.")
        else:
            walk.chars += 8
        if walk.chars > limits.MAX_TEXT_CHARS:
            raise ConstraintError(f"{WHAT}: more than the limit of {limits.MAX_TEXT_CHARS} characters.")


def _check_keywords(schema: dict[str, Any], link: tuple | None, walk: _Walk) -> None:
    """The bounds and contradictions of one (sub)schema's own keywords."""
    where = _path(link)
    for keyword in _ITEM_KEYWORDS:
        count = _number(schema.get(keyword))
        if count is not None and count > limits.MAX_ITEMS:
            raise ConstraintError(f"{WHAT}: {keyword} {_show(count)} at {where} exceeds the limit of "
                                  f"{limits.MAX_ITEMS}.")
        if count is not None and count > 0:
            walk.items += int(count)
            if walk.items > limits.MAX_TOTAL_ITEMS:
                raise ConstraintError(f"{WHAT}: its item and property counts add up to more than the limit of "
                                      f"{limits.MAX_TOTAL_ITEMS} (at {where}).")
    lengths = [(_number(schema.get(k)), k) for k in ("maxLength", "minLength")]
    length, keyword = max(((n, k) for n, k in lengths if n is not None), default=(None, ""))
    if length is not None:
        if length > limits.MAX_TEXT_REPEAT:
            raise ConstraintError(f"{WHAT}: {keyword} {_show(length)} at {where} exceeds the limit of "
                                  f"{limits.MAX_TEXT_REPEAT}.")
        bounds = (lengths[0][0], lengths[1][0])
        if bounds not in walk.string_bounds:  # strings bounded alike are compiled once
            walk.string_bounds.add(bounds)
            walk.text.text_repeat += int(length)
            if walk.text.text_repeat > limits.MAX_TEXT_REPEAT:
                raise ConstraintError(f"{WHAT}: the length bounds of its strings and the repetitions of its patterns "
                                      f"add up to more than the limit of {limits.MAX_TEXT_REPEAT} (at {where}).")
    for low_key, high_key, strict in _PAIRS:
        low, high = _number(schema.get(low_key)), _number(schema.get(high_key))
        if low is not None and high is not None and (low > high or (strict and low == high)):
            relation = "is not below" if strict else "is greater than"
            raise ConstraintError(f"{WHAT}: {low_key} {_show(low)} {relation} {high_key} {_show(high)} at {where}.")
    properties = schema.get("properties")
    if isinstance(properties, dict):
        if len(properties) > limits.MAX_OBJECT_PROPERTIES:
            raise ConstraintError(f"{WHAT}: {len(properties)} properties at {where} exceed the limit of "
                                  f"{limits.MAX_OBJECT_PROPERTIES} for one object.")
        walk.properties += len(properties)
        if walk.properties > limits.MAX_TOTAL_PROPERTIES:
            raise ConstraintError(f"{WHAT}: more than the limit of {limits.MAX_TOTAL_PROPERTIES} properties in all "
                                  f"(at {where}).")
    required = schema.get("required")
    if (schema.get("additionalProperties") is False and isinstance(required, list)
            and all(isinstance(name, str) for name in required)):
        missing = [name for name in required if name not in (properties if isinstance(properties, dict) else {})]
        if missing and not schema.get("patternProperties"):
            raise ConstraintError(f"{WHAT}: required names {', '.join(map(repr, missing[:5]))} at {where}, which "
                                  "additionalProperties: false forbids (they are not in properties).")
    enum = schema.get("enum")
    if isinstance(enum, list):
        if len(enum) > limits.MAX_ENUM_VALUES:
            raise ConstraintError(f"{WHAT}: an enum of {len(enum)} values at {where} exceeds the limit of "
                                  f"{limits.MAX_ENUM_VALUES}.")
        walk.enum_values += len(enum)
    walk.enum_values += "const" in schema
    if walk.enum_values > limits.MAX_TOTAL_ENUM_VALUES:
        raise ConstraintError(f"{WHAT}: more than the limit of {limits.MAX_TOTAL_ENUM_VALUES} enum and const values "
                              f"in all (at {where}).")
    patterns = [schema["pattern"]] if isinstance(schema.get("pattern"), str) else []
    if isinstance(schema.get("patternProperties"), dict):
        patterns += list(schema["patternProperties"])
    for pattern in patterns:
        if len(pattern) > limits.MAX_PATTERN_CHARS:
            raise ConstraintError(f"{WHAT}: a pattern of {len(pattern)} characters at {where} exceeds the limit of "
                                  f"{limits.MAX_PATTERN_CHARS}.")
        scan(pattern, "regex", f"{WHAT}: the pattern at {where}", walk.text)


def check_valid(schema: Any) -> None:
    """Validity as JSON Schema, by the metaschema its $schema names (2020-12 when it names none)."""
    from jsonschema import Draft202012Validator, validators
    from jsonschema.exceptions import best_match

    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(f"{WHAT} must be a JSON object (a schema), not a {type(schema).__name__}.")
    uri = schema.get("$schema") if isinstance(schema, dict) else None
    cls = validators.validator_for({"$schema": uri} if isinstance(uri, str) else {}, default=Draft202012Validator)
    meta = validators.validator_for(cls.META_SCHEMA, default=cls)(cls.META_SCHEMA)  # no format checks: patterns
    error = best_match(meta.iter_errors(schema))                                     # are ECMA-262, not Python's
    if error is None:
        return
    message = error.message
    if error.path and error.path[-1] == "type" and error.validator == "anyOf":
        message = f"{error.instance!r} is not a JSON Schema type ({', '.join(_TYPES)})"
    raise ConstraintError(f"{WHAT} is not a valid JSON Schema: {_short(message)} (at {error.json_path}).")


def _number(value: Any) -> float | int | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _show(value: float | int) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _short(message: str) -> str:
    return message if len(message) <= 200 else message[:200] + "…"


def _path(link: tuple | None) -> str:
    """`$.properties.a.items[0]` for a path link (key, parent link)."""
    parts: list[str] = []
    while link is not None:
        key, link = link
        if isinstance(key, int):
            parts.append(f"[{key}]")
        elif key.isidentifier():
            parts.append(f".{key}")
        else:
            parts.append(f"[{json.dumps(key)[:40]}]")
    text = "$" + "".join(reversed(parts))
    return text if len(text) <= 120 else f"{text[:60]}…{text[-50:]}"
