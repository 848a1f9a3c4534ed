"""Typed errors, and the one message a policy's validation errors make.

Each error subclasses the built-in a caller would catch for that kind of mistake.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError


class PruningError(Exception):
    """Base class of every error raised by prune_plugin."""


class PolicyError(PruningError, ValueError):
    """A pruning policy (or a config entry holding one) is invalid."""


class TargetingError(PruningError, ValueError):
    """The policy's target patterns match no prunable module of the model."""


class AttachError(PruningError, RuntimeError):
    """The model cannot be attached to (already attached, or unsupported weights)."""


class StateError(PruningError, ValueError):
    """Saved pruning state does not fit the model or policy it is loaded into."""


class NumericalError(PruningError, FloatingPointError):
    """Training diverged: NaN or Inf in the scores or weights being pruned."""


# -- policy errors ----------------------------------------------------------------------------

def _describe_allowed(err: Mapping[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        return f" Allowed: {ctx['expected']}."
    return ""


def _suggest(value: Any, choices: list[str]) -> str:
    if isinstance(value, str):
        close = difflib.get_close_matches(value, choices, n=1)
        if close:
            return f" Did you mean {close[0]!r}?"
    return ""


def policy_error(err: ValidationError, models: Mapping[str, type[BaseModel]],
                 base: type[BaseModel], *, source: str = "policy") -> PolicyError:
    """pydantic's errors about a policy as one message: field, value, what is allowed, how to
    fix. ``models``: each method's model, by method (the union's tags); ``base``: their base
    (the fields of every method)."""
    errors = [e for e in err.errors() if e["type"] != "default_factory_not_called"]
    for e in errors:
        # pydantic runs the overridden __init__ inside model_validate: unwrap its PolicyError.
        inner = (e.get("ctx") or {}).get("error")
        if isinstance(inner, PolicyError):
            return _format(inner.lines, inner.errors, source)  # type: ignore[attr-defined]
    lines = []
    method: str | None
    for e in errors:
        loc = list(e["loc"])
        if loc and isinstance(loc[0], str) and loc[0] in models:  # the union's tag
            method, loc = loc[0], loc[1:]
        else:  # a method's model validated directly: its title is the class name
            method = next((m for m, cls in models.items() if cls.__name__ == err.title), None)
        model = base if method is None else models[method]
        fields = list(model.model_fields)
        name = ".".join(str(p) for p in loc) or "(policy)"
        value = e.get("input")
        kind = e["type"]
        if kind == "extra_forbidden":
            users = [m for m, cls in models.items() if name in cls.model_fields] \
                if method is not None and len(loc) == 1 else []
            if users:
                lines.append(f"field {name!r} (= {value!r}) does not apply to method "
                             f"{method!r}; it is used by {', '.join(map(repr, users))}. Fix: "
                             f"remove {name!r} or change 'method'.")
            else:
                lines.append(f"{name}: unknown field (value {value!r}).{_suggest(name, fields)} "
                             f"Allowed fields: {', '.join(fields)}.")
        elif kind == "union_tag_not_found":
            typos = [k for k in value if isinstance(k, str) and k != "method"
                     and difflib.get_close_matches(k, ["method"], n=1)] \
                if isinstance(value, dict) else []
            lines += [f"{k}: unknown field (value {value[k]!r}). Did you mean 'method'?"
                      for k in typos]
            lines.append("method: required field is missing. Fix: add 'method' (one of "
                         f"{', '.join(map(repr, models))}).")
        elif kind == "union_tag_invalid":
            tag, methods = (e.get("ctx") or {}).get("tag"), list(models)
            lines.append(f"method: got {tag!r}. Allowed: {_or_list(methods)}."
                         f"{_suggest(tag, methods)}")
        elif kind == "model_attributes_type" or (kind == "dict_type" and not loc):
            lines.append(f"(policy): expected a mapping of policy fields, got "
                         f"{type(value).__name__}. Fix: write it as "
                         '{"method": "movement", "total_steps": ...}.')
        elif kind == "missing":
            info = model.model_fields.get(name)
            desc = info.description if info is not None else None
            lines.append(f"{name}: required field is missing. Fix: add {name!r}"
                         + (f" ({desc})" if desc else "") + ".")
        elif kind == "literal_error":
            allowed = (e.get("ctx") or {}).get("expected", "")
            choices = [c.strip(" '") for c in allowed.replace(" or ", ",").split(",") if c.strip()]
            lines.append(f"{name}: got {value!r}. Allowed: {allowed}.{_suggest(value, choices)}")
        elif kind == "value_error":
            lines.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            lines.append(f"{name}: got {value!r} ({type(value).__name__}): {e['msg']}."
                         f"{_describe_allowed(e)} Fix: give {name!r} a value that fits.")
    return _format(lines, errors, source)


def _or_list(names: list[str]) -> str:
    quoted = [repr(n) for n in names]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _format(lines: list[str], errors: list[Any], source: str) -> PolicyError:
    n = len(lines)
    head = f"invalid pruning policy ({source}): {n} error{'s' if n > 1 else ''}"
    error = PolicyError(head + "\n  - " + "\n  - ".join(lines))
    error.lines = lines  # type: ignore[attr-defined]
    error.errors = errors  # type: ignore[attr-defined]
    return error
