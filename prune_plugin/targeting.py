"""Which modules a policy prunes: the one documented matcher.

A module is a target when it is an ``nn.Linear`` whose qualified name (as in
``model.named_modules()``) matches one of ``policy.targets`` (``re.search``) and none of
``policy.exclude``. Matching nothing is an error that shows what exists.
"""

from __future__ import annotations

import re

from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from prune_plugin.errors import TargetingError


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def find_targets(model: nn.Module, targets: list[str], exclude: list[str]
                 ) -> list[tuple[str, nn.Linear]]:
    """The ``(name, module)`` pairs to prune, in model order. Raises TargetingError if none."""
    linears = linear_modules(model)
    inc = [re.compile(p) for p in targets]
    exc = [re.compile(p) for p in exclude]
    matched = [(name, m) for name, m in linears
               if any(p.search(name) for p in inc) and not any(p.search(name) for p in exc)]
    if not matched:
        shown = ", ".join(repr(n) for n, _ in linears[:8]) + (" ..." if len(linears) > 8 else "")
        raise TargetingError(
            f"targets {targets} with exclude {exclude} match none of the model's "
            f"{len(linears)} nn.Linear modules"
            + (f" (some of them: {shown})" if linears else " (it has none)")
            + ". Fix: adjust 'targets'/'exclude'; they are regexes searched in module names.")
    opaque = [name for name, m in matched if isinstance(m, NonDynamicallyQuantizableLinear)]
    if opaque:
        raise TargetingError(
            f"{opaque} belong to nn.MultiheadAttention, which reads out_proj.weight directly "
            "instead of calling its forward, so a mask on it would be silently ignored. Fix: "
            "add 'out_proj' to 'exclude'.")
    return matched
