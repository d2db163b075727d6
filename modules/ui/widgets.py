"""Widgets drawn from pydantic fields, and back: one place that knows how a typed field looks in the browser.

GenerationParams, ChatSettings and every loader's Options are drawn through `widget_for`, so a new field appears
in the UI without UI code. `to_widget` / `from_widget` convert between a field's value and what its widget holds
(lists and mappings travel as JSON text).
"""
from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import annotated_types
import gradio as gr
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from modules.errors import ConfigError

_SLIDER_FLOAT_SPAN = 10.0  # bounded floats spanning at most this become sliders; wider ones number boxes
_SLIDER_INT_SPAN = 64


@dataclass(frozen=True)
class FieldKind:
    """What a field holds, after unwrapping `X | None`."""

    base: Any
    optional: bool
    choices: tuple[Any, ...] | None = None  # Literal values

    @property
    def is_list(self) -> bool:
        return typing.get_origin(self.base) is list

    @property
    def is_dict(self) -> bool:
        return typing.get_origin(self.base) is dict or self.base is dict


def field_kind(annotation: Any) -> FieldKind:
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else annotation
    if typing.get_origin(annotation) is Literal:
        return FieldKind(annotation, optional, tuple(typing.get_args(annotation)))
    return FieldKind(annotation, optional)


def bounds(field: FieldInfo) -> tuple[float | None, float | None]:
    low = high = None
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            low = item.ge
        elif isinstance(item, annotated_types.Gt):
            low = item.gt
        elif isinstance(item, annotated_types.Le):
            high = item.le
        elif isinstance(item, annotated_types.Lt):
            high = item.lt
    return low, high


def default_of(field: FieldInfo) -> Any:
    return field.get_default(call_default_factory=True)


def widget_for(name: str, field: FieldInfo, value: Any, *, label: str | None = None, render: bool = True,
               elem_prefix: str = "", **extra: Any) -> gr.components.Component:
    """A Gradio component for one field, labelled with its name and described by its description."""
    kind = field_kind(field.annotation)
    common: dict[str, Any] = {"label": label or name, "render": render,
                              "elem_id": f"{elem_prefix}{name}".replace("_", "-"), **extra}
    info = field.description or None
    shown = to_widget(kind, value)
    if kind.choices is not None:
        return gr.Dropdown(choices=list(kind.choices), value=shown, info=info, **common)
    if kind.base is bool:
        return gr.Checkbox(value=bool(shown), info=info, **common)
    if kind.base in (int, float) and kind.optional:  # empty means "unset": a number box cannot be empty
        return gr.Textbox(value="" if shown is None else str(shown), placeholder="default", info=info, **common)
    if kind.base in (int, float):
        low, high = bounds(field)
        is_int = kind.base is int
        span_limit = _SLIDER_INT_SPAN if is_int else _SLIDER_FLOAT_SPAN
        if low is not None and high is not None and high - low <= span_limit and not kind.optional:
            step = 1 if is_int else 0.01
            return gr.Slider(minimum=low, maximum=high, step=step, value=shown, info=info, **common)
        return gr.Number(value=shown, precision=0 if is_int else None, minimum=low, maximum=high, info=info,
                         **common)
    lines = 4 if kind.is_dict or name.endswith(("grammar_string", "_prompt", "context", "bio", "message",
                                                 "command", "dialogue", "greeting")) else 1
    hint = ' (JSON list, or one item per line)' if kind.is_list else (" (JSON)" if kind.is_dict else "")
    return gr.Textbox(value=shown, lines=lines, max_lines=20 if lines > 1 else 1,
                      info=(info or "") + hint or None, **common)


def to_widget(kind: FieldKind, value: Any) -> Any:
    """The value a widget shows for a field value."""
    if kind.is_list:
        if value is None:
            return ""
        return json.dumps(list(value), ensure_ascii=False)
    if kind.is_dict:
        return "" if value is None or value == {} else json.dumps(value, ensure_ascii=False, indent=1)
    if kind.base is str and value is None:
        return ""
    if kind.base is str and not isinstance(value, str) and value is not None:
        return str(value)
    return value


def from_widget(name: str, kind: FieldKind, value: Any) -> Any:
    """The field value for what a widget holds; raises ConfigError naming the field when the text is malformed."""
    if kind.is_list:
        text = (value or "").strip() if isinstance(value, str) else value
        if not text:
            return None if kind.optional else []
        if isinstance(text, list):
            return text
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"'{name}' is not a valid JSON list: {exc.msg} (column {exc.colno}).") from None
            except RecursionError:
                raise ConfigError(f"'{name}' is nested too deeply to read.") from None
            if not isinstance(parsed, list):
                raise ConfigError(f"'{name}' must be a JSON list.")
            return parsed
        return [line for line in text.splitlines() if line.strip()]
    if kind.is_dict:
        text = (value or "").strip() if isinstance(value, str) else value
        if not text:
            return None if kind.optional else {}
        if isinstance(text, dict):
            return text
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"'{name}' is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}).") \
                from None
        except RecursionError:
            raise ConfigError(f"'{name}' is nested too deeply to read.") from None
        if not isinstance(parsed, dict):
            raise ConfigError(f"'{name}' must be a JSON object.")
        return parsed
    if kind.optional and isinstance(value, str) and not value.strip():
        return None
    if kind.base in (int, float) and isinstance(value, str):
        try:
            return kind.base(value.strip())
        except ValueError:
            raise ConfigError(f"'{name}' needs {'a whole number' if kind.base is int else 'a number'}, "
                              f"not {value.strip()!r}.") from None
    if kind.base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind.base in (int, float) and value is None and not kind.optional:
        raise ConfigError(f"'{name}' needs a number.")
    return value


class FieldPanel:
    """The widgets of one pydantic model's fields, created unrendered so that several tabs can place and read
    them. `mapping` turns the widget values (in `names` order) back into field values."""

    def __init__(self, model: type[BaseModel], values: BaseModel | dict[str, Any], *, elem_prefix: str,
                 overrides: dict[str, gr.components.Component] | None = None, skip: tuple[str, ...] = ()):
        self.model = model
        current = values.model_dump() if isinstance(values, BaseModel) else {
            name: values.get(name, default_of(field)) for name, field in model.model_fields.items()}
        self.kinds = {name: field_kind(field.annotation) for name, field in model.model_fields.items()}
        self.components: dict[str, gr.components.Component] = {}
        for name, field in model.model_fields.items():
            if name in skip:
                continue
            if overrides and name in overrides:
                self.components[name] = overrides[name]
            else:
                self.components[name] = widget_for(name, field, current[name], render=False,
                                                   elem_prefix=elem_prefix)

    @property
    def names(self) -> list[str]:
        return list(self.components)

    @property
    def inputs(self) -> list[gr.components.Component]:
        return list(self.components.values())

    def mapping(self, values: list[Any] | tuple[Any, ...]) -> dict[str, Any]:
        return {name: from_widget(name, self.kinds[name], value) for name, value in zip(self.names, values)}

    def updates_for(self, model_values: BaseModel) -> list[Any]:
        """New widget values showing `model_values` (in `names` order)."""
        return [to_widget(self.kinds[name], getattr(model_values, name)) for name in self.names]

    def render(self, names: list[str] | None = None) -> None:
        for name in names or self.names:
            if name in self.components and not self.components[name].is_rendered:
                self.components[name].render()
