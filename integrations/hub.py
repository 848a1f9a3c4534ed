"""Hugging Face models saved by a pruning run: ``load_shrunk`` loads a shrunk one.

``finalize(model, shrink=True)`` removes pruned heads and neurons and records the new layer
shapes and head counts in the model's config (``prune_plugin_shapes``,
``prune_plugin_attributes``); after ``save_pretrained`` the stock class cannot build that model
alone, so :func:`load_shrunk` builds it with the recorded shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from prune_plugin.structure import ATTRIBUTES_KEY, SHAPES_KEY, resize_as_recorded


def load_shrunk(folder: str | Path, model_class: Any = None, **kwargs: Any) -> nn.Module:
    """Load a model saved after ``finalize(model, shrink=True)``: the stock class's own
    ``from_pretrained`` (renamed keys, tied weights, dtype, device placement included), its
    layers resized and head counts set as recorded in the config (``prune_plugin_shapes``,
    ``prune_plugin_attributes``) right after the model is built, before the weights load.
    ``model_class`` defaults to the config's architecture."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    shapes = getattr(config, SHAPES_KEY, None) or {}
    attributes = getattr(config, ATTRIBUTES_KEY, None) or {}
    if model_class is None:
        model_class = getattr(transformers, (config.architectures or ["AutoModel"])[0])
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is not None:  # an Auto class: the concrete class it would build
        model_class = mapping[type(config)]
    if not shapes:
        return model_class.from_pretrained(folder, **kwargs)
    own_init = model_class.__dict__.get("__init__")
    stock_init = model_class.__init__

    def init_then_resize(self: nn.Module, *args: Any, **kw: Any) -> None:
        stock_init(self, *args, **kw)
        if type(self) is model_class:
            resize_as_recorded(self, shapes, attributes)

    # The stock class itself, so that transformers' loading rules keyed on it apply; restored
    # at once (not thread-safe against building the same class elsewhere meanwhile).
    model_class.__init__ = init_then_resize
    try:
        return model_class.from_pretrained(folder, **kwargs)
    finally:
        if own_init is None:
            del model_class.__init__
        else:
            model_class.__init__ = own_init
