"""Architecture knowledge: which layers of a Transformer block share a head or a neuron, and how
fused projections lay their units out.

A :class:`Family` names, relative to a repeated block, the modules whose rows (outputs) and
columns (inputs) split into the same units, the fused projections among them and their layout,
and the attention module's attributes that count heads (a shrink rescales them so the stock
forward reshapes by the new count). The first family whose groups all match a model's blocks is
that model's; a policy's ``unit_groups`` replaces this for any other model.

:func:`unit_lines` is the pure part: for a fused matrix, the unit each output line belongs to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from prune_plugin.errors import TargetingError
from prune_plugin.policy import FusedLayout, UnitGroupSpec

Specs = list[UnitGroupSpec]


@dataclass(frozen=True)
class Family:
    """One architecture family: its unit groups (from the model's config when they depend on
    it) and the head-count attributes of its attention module."""

    name: str
    #: The transformers ``config.model_type`` values it describes: a model with a config is
    #: matched by type (OpenAI-GPT has GPT-2's names and BLOOM Falcon's, not their forwards).
    model_types: tuple[str, ...]
    groups: Specs | Callable[[Any], Specs]
    #: Attributes of the attention module (the parent of a heads group's first member) that
    #: count heads or head-sized widths; a ``config.`` path gives the module its own config copy.
    head_counts: tuple[str, ...] = ()
    #: Attributes of the attention module derived from its counts, set again after a shrink
    #: where the module has them: name -> (numerator, denominator), the new value their quotient
    #: (transformers 5.25's Falcon repeats its key/value heads num_heads // num_kv_heads times).
    derived_counts: tuple[tuple[str, str, str], ...] = ()
    #: False where the layers share per-head state, so pruned heads stay in place (zeroed) when
    #: the model shrinks: T5's relative position bias is computed by the first layer of a stack
    #: for every layer.
    removable_heads: bool = True

    def specs(self, config: Any) -> Specs:
        return self.groups(config) if callable(self.groups) else self.groups


def _heads(rows: list[str], columns: list[str], **kw: Any) -> UnitGroupSpec:
    return UnitGroupSpec(kind="heads", rows=rows, columns=columns, **kw)


def _neurons(rows: list[str], columns: list[str], **kw: Any) -> UnitGroupSpec:
    return UnitGroupSpec(kind="neurons", rows=rows, columns=columns, **kw)


def _falcon(config: Any) -> Specs:
    qkv = "self_attention.query_key_value"
    heads = config.num_attention_heads if config is not None else None
    if config is None or getattr(config, "new_decoder_architecture", False):
        kv = getattr(config, "num_kv_heads", None)
        attention = _heads([qkv], ["self_attention.dense"], fused={qkv: "qkv_grouped"}, units=kv)
    elif getattr(config, "multi_query", False):
        attention = _heads([qkv], ["self_attention.dense"], fused={qkv: "qkv_multi_query"},
                           units=heads)
    else:
        attention = _heads([qkv], ["self_attention.dense"], fused={qkv: "qkv_interleaved"},
                           units=heads)
    return [attention, _neurons(["mlp.dense_h_to_4h"], ["mlp.dense_4h_to_h"])]


def _t5_attention(name: str) -> UnitGroupSpec:
    return _heads([f"{name}.q", f"{name}.k", f"{name}.v"], [f"{name}.o"])


FAMILIES: list[Family] = [
    Family("BERT, RoBERTa, ELECTRA", ("bert", "roberta", "electra", "xlm-roberta", "camembert",
                                    "roberta-prelayernorm", "megatron-bert"), [
        _heads(["attention.self.query", "attention.self.key", "attention.self.value"],
               ["attention.output.dense"]),
        _neurons(["intermediate.dense"], ["output.dense"])],
        head_counts=("num_attention_heads", "all_head_size")),
    Family("DistilBERT", ("distilbert",), [
        _heads(["attention.q_lin", "attention.k_lin", "attention.v_lin"], ["attention.out_lin"]),
        _neurons(["ffn.lin1"], ["ffn.lin2"])], head_counts=("n_heads",)),
    Family("ViT", ("vit", "deit"), [
        _heads(["attention.q_proj", "attention.k_proj", "attention.v_proj"],
               ["attention.o_proj"]),
        _neurons(["mlp.fc1"], ["mlp.fc2"])], head_counts=("num_heads", "num_attention_heads")),
    Family("Llama, Mistral, Qwen2", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                                   "mixtral", "qwen2_moe", "qwen3_moe"), [
        _heads(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
               ["self_attn.o_proj"]),
        _neurons(["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"])]),
    Family("Phi", ("phi",), [
        _heads(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.dense"]),
        _neurons(["mlp.fc1"], ["mlp.fc2"])]),
    Family("Phi3", ("phi3",), [
        _heads(["self_attn.qkv_proj"], ["self_attn.o_proj"],
               fused={"self_attn.qkv_proj": "qkv_stacked"}),
        _neurons(["mlp.gate_up_proj"], ["mlp.down_proj"], fused={"mlp.gate_up_proj": "halves"})],
        # its forward splits qkv at config.num_attention_heads * head_dim
        head_counts=("num_key_value_heads", "config.num_attention_heads",
                     "config.num_key_value_heads")),
    Family("GPT-NeoX", ("gpt_neox",), [
        _heads(["attention.query_key_value"], ["attention.dense"],
               fused={"attention.query_key_value": "qkv_interleaved"}),
        _neurons(["mlp.dense_h_to_4h"], ["mlp.dense_4h_to_h"])]),
    Family("Falcon", ("falcon",), _falcon, head_counts=("num_heads", "num_kv_heads"),
           derived_counts=(("num_key_value_groups", "num_heads", "num_kv_heads"),)),
    Family("GPT-2", ("gpt2",), [
        _heads(["attn.c_attn"], ["attn.c_proj"], fused={"attn.c_attn": "qkv_stacked"}),
        _neurons(["mlp.c_fc"], ["mlp.c_proj"])], head_counts=("num_heads", "split_size")),
    Family("T5", ("t5", "mt5"), [
        _t5_attention("SelfAttention"), _t5_attention("EncDecAttention"),
        _neurons(["DenseReluDense.wi"], ["DenseReluDense.wo"]),
        _neurons(["DenseReluDense.wi_0", "DenseReluDense.wi_1"], ["DenseReluDense.wo"])],
        removable_heads=False),
]


def unit_lines(layout: FusedLayout, lines: int, units: int, query_heads: int) -> Tensor:
    """The unit of each output line of a fused projection (``units`` for lines no unit owns:
    a multi-query projection's shared key and value). Raises ValueError, saying why, when
    ``lines`` cannot be split that way.

    ``units`` is the number of key/value heads for the qkv layouts (multi-query: query heads),
    of neurons for ``halves``; ``query_heads`` the number of query heads.
    """
    if layout == "halves":
        if lines != 2 * units:
            raise ValueError(f"{lines} rows are not two halves of {units} neurons")
        return torch.arange(lines) % units
    if layout == "qkv_multi_query":
        head_dim, rest = divmod(lines, units + 2)
        if rest or head_dim == 0:
            raise ValueError(f"{lines} rows are not {units} query heads and one key and value "
                             "head")
        owner = torch.arange(lines) // head_dim
        return owner.clamp_(max=units)  # the key and value lines: shared
    if query_heads % units:
        raise ValueError(f"{query_heads} query heads do not split over {units} key/value heads")
    group = query_heads // units  # query heads per key/value head
    head_dim, rest = divmod(lines, query_heads + 2 * units)
    if rest or head_dim == 0:
        raise ValueError(f"{lines} rows are not {query_heads} query heads and {units} key and "
                         "value heads of one size")
    if layout == "qkv_interleaved":
        if group != 1:
            raise ValueError("an interleaved qkv projection has as many key/value heads as "
                             f"query heads, not {units} for {query_heads}")
        return torch.arange(lines) // (3 * head_dim)
    if layout == "qkv_grouped":
        return torch.arange(lines) // ((group + 2) * head_dim)
    # qkv_stacked: [q heads | k heads | v heads]; query head i belongs to key/value head i // group
    q = torch.arange(query_heads * head_dim) // (head_dim * group)
    kv = torch.arange(units * head_dim) // head_dim
    return torch.cat([q, kv, kv])


def fused_head_dim(layout: FusedLayout, lines: int, units: int, query_heads: int) -> int:
    """A fused qkv projection's head size (its lines validated by :func:`unit_lines`)."""
    if layout == "qkv_multi_query":
        return lines // (units + 2)
    return lines // (query_heads + 2 * units)


def find_family(names: set[str], config: Any, kinds: tuple[str, ...]
                ) -> tuple[Family, Specs] | None:
    """The family of a model: by ``config.model_type`` when it has one (then its groups must
    match), else the first family each of whose groups appears whole wherever it appears in a
    block (by the modules' qualified ``names``); either way every kind in ``kinds`` (heads,
    neurons) must be found. Returns it with its specs for ``config``."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type and model_type not in family.model_types:
            continue
        specs = family.specs(config)
        kinds_found: set[str] = set()
        for spec in specs:
            first = spec.rows[0]
            prefixes = [n[:len(n) - len(first)] for n in names
                        if n == first or n.endswith("." + first)]
            complete = all(p + m in names for p in prefixes for m in (*spec.rows, *spec.columns))
            if prefixes and not complete:
                break
            if prefixes:
                kinds_found.add(spec.kind)
        else:
            if set(kinds) <= kinds_found:
                return family, specs
    return None


def unknown_family(shown: str) -> TargetingError:
    return TargetingError(
        "structured pruning needs to know which modules share a head's or a neuron's weights, "
        f"and this model is none of the known families ({', '.join(f.name for f in FAMILIES)}). "
        "Fix: name them in the policy, relative to a repeated block, e.g. unit_groups: "
        "[{kind: neurons, rows: ['mlp.fc1'], columns: ['mlp.fc2']}, {kind: heads, rows: "
        "['attn.qkv'], columns: ['attn.proj'], fused: {'attn.qkv': qkv_stacked}}]. Its "
        f"prunable modules: {shown}.")
