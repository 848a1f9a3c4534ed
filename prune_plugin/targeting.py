"""Which modules a policy prunes: the one documented matcher.

A module is a target when it is a linear layer (``nn.Linear``, or transformers' ``Conv1D``,
which GPT-2 uses and which stores its weight transposed, ``[in, out]``) whose qualified name (as in
``model.named_modules()``) matches one of ``policy.targets`` (``re.search``) and none of
``policy.exclude``, and that structure does not rule out:

- **adapters** (PEFT's LoRA ``lora_A``/``lora_B`` and the like) are never pruned: they are not
  the model's weights, and they merge into them later. The adapted layer's ``base_layer`` is.
- **output heads** (``exclude_heads``, on by default): in a Hugging Face model, every Linear
  outside its base model (``classifier``, DistilBERT's ``pre_classifier``, ``qa_outputs``,
  ``lm_head``); in a plain PyTorch model, the Linears whose output reaches the model's output
  through single-input operations only (found by ``torch.fx``; when the model cannot be
  traced, only the names in ``exclude`` protect its head).

Matching nothing is an error that shows what exists, including layer types that hold weights
but cannot be pruned (convolutions).
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from typing import cast

from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from prune_plugin.errors import TargetingError
from prune_plugin.policy import PruningPolicy


def is_transposed(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D``: ``y = x W + b``, weight ``[in, out]``
    (found without importing transformers: a model holding one has imported it)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


def weight_of(module: nn.Module) -> nn.Parameter:
    """A linear layer's weight, typed (``nn.Module.__getattr__`` is not)."""
    return cast(nn.Parameter, module.weight)


def bias_of(module: nn.Module) -> nn.Parameter | None:
    return cast("nn.Parameter | None", module.bias)


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_transposed(module)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(outputs, inputs) of a prunable layer, whole under ZeRO-3."""
    weight = weight_of(module)
    shape = tuple(getattr(weight, "ds_shape", weight.shape))
    return (shape[1], shape[0]) if is_transposed(module) else (shape[0], shape[1])


def prunable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every prunable layer of ``model`` by qualified name, in model order."""
    return {name: m for name, m in model.named_modules() if is_prunable(m)}


def find_targets(model: nn.Module, policy: PruningPolicy) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs to prune, in model order. Raises TargetingError if none."""
    linears = list(prunable_modules(model).items())
    ruled_out = adapter_modules(model)
    heads = head_modules(model) if policy.exclude_heads else set()
    inc = [re.compile(p) for p in policy.targets]
    exc = [re.compile(p) for p in policy.exclude]
    matched = [(name, m) for name, m in linears
               if id(m) not in ruled_out and id(m) not in heads
               and any(p.search(name) for p in inc) and not any(p.search(name) for p in exc)]
    if not matched:
        raise TargetingError(_nothing_matched(model, policy, linears, ruled_out, heads))
    opaque = [name for name, m in matched if isinstance(m, NonDynamicallyQuantizableLinear)]
    if opaque:
        raise TargetingError(
            f"{opaque} belong to nn.MultiheadAttention, which reads out_proj.weight directly "
            "instead of calling its forward, so a mask on it would be silently ignored. Fix: "
            "add 'out_proj' to 'exclude'.")
    return matched


def _nothing_matched(model: nn.Module, policy: PruningPolicy,
                     linears: list[tuple[str, nn.Module]], adapters: set[int],
                     heads: set[int]) -> str:
    shown = ", ".join(repr(n) for n, _ in linears[:8]) + (" ..." if len(linears) > 8 else "")
    message = (f"targets {policy.targets} with exclude {policy.exclude} match none of the "
               f"model's {len(linears)} linear layers"
               + (f" (some of them: {shown})" if linears else " (it has none)"))
    n_heads = sum(id(m) in heads for _, m in linears)
    n_adapters = sum(id(m) in adapters for _, m in linears)
    if n_heads or n_adapters:
        message += (f"; {n_heads} are output heads and {n_adapters} adapters, left dense by "
                    "structure")
    others = unsupported_layers(model)
    if others:
        kinds = ", ".join(f"{count} {kind} (e.g. {example!r})"
                          for kind, (count, example) in others.items())
        message += (f". It also has {kinds}, which prune_plugin cannot prune: it prunes "
                    "linear layers only (nn.Linear, transformers' Conv1D)")
    fix = " Fix: adjust 'targets'/'exclude'; they are regexes searched in module names"
    if n_heads:
        fix += ", and set exclude_heads: false to prune output heads too"
    return message + "." + fix + "."


def unsupported_layers(model: nn.Module) -> dict[str, tuple[int, str]]:
    """Module types that hold a matrix-like weight but are not prunable (convolutions):
    {type name: (count, first module name)}."""
    counts: Counter[str] = Counter()
    first: dict[str, str] = {}
    for name, m in model.named_modules():
        w = m._parameters.get("weight")
        if is_prunable(m) or isinstance(m, (nn.Embedding, nn.EmbeddingBag)) or w is None \
                or w.dim() < 2:
            continue
        kind = f"{type(m).__module__}.{type(m).__qualname__}"
        counts[kind] += 1
        first.setdefault(kind, name)
    return {kind: (count, first[kind]) for kind, count in counts.items()}


def adapter_modules(model: nn.Module) -> set[int]:
    """ids of the modules inside PEFT adapters (a tuner layer's ``adapter_layer_names``, e.g.
    LoRA's ``lora_A`` and ``lora_B``), found without importing PEFT."""
    ids: set[int] = set()
    for m in model.modules():
        names = getattr(m, "adapter_layer_names", None)
        if not isinstance(names, (tuple, list)) or not callable(getattr(m, "get_base_layer", None)):
            continue
        for attr in names:
            sub = getattr(m, attr, None)
            if isinstance(sub, nn.Module):
                ids.update(id(x) for x in sub.modules())
    return ids


def _hf_base_model(m: nn.Module) -> nn.Module | None:
    """A Hugging Face task model's base model (``BertForX.bert``), or None."""
    prefix = getattr(type(m), "base_model_prefix", None)
    if not isinstance(prefix, str) or not prefix:
        return None
    base = m._modules.get(prefix)
    return base if isinstance(base, nn.Module) and base is not m else None


def _is_hf_model(m: nn.Module) -> bool:
    return isinstance(getattr(type(m), "base_model_prefix", None), str) and hasattr(m, "config")


def head_modules(model: nn.Module) -> set[int]:
    """ids of the Linears that compute the model's output (see the module docstring)."""
    heads: set[int] = set()
    hf = False
    for m in model.modules():
        hf = hf or _is_hf_model(m)
        base = _hf_base_model(m)
        if base is None:
            continue
        inside = {id(x) for x in base.modules()}
        heads.update(id(x) for x in m.modules() if is_prunable(x) and id(x) not in inside)
    if hf:
        return heads
    return _output_linears(model)


def _output_linears(model: nn.Module) -> set[int]:
    """The Linears of a plain model that compute its output: traced with ``torch.fx``, those
    reached from the output through single-input operations only (activations, dropout,
    norms, reshapes), not through a residual sum or a concatenation (the last FFN layer of a
    Transformer block is no head). None when the model cannot be traced: then only the
    names in ``exclude`` protect its head, as guessing could leave a real layer dense."""
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - any untraceable forward
        return set()
    modules = dict(graph.named_modules())
    found: set[int] = set()
    for output in (n for n in graph.graph.nodes if n.op == "output"):
        for node in output.all_input_nodes:  # each returned tensor
            while True:
                target = modules.get(node.target) if node.op == "call_module" else None
                if target is not None and is_prunable(target):
                    found.add(id(target))
                    break
                inputs = node.all_input_nodes
                if len(inputs) != 1:
                    break
                node = inputs[0]
    return found
