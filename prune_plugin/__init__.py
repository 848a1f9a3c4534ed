"""prune_plugin: movement pruning (Sanh, Wolf & Rush, 2020) for any PyTorch training loop.

    optimizer = PruningOptimizer(torch.optim.AdamW(model.parameters()), policy, model=model)
"""

from prune_plugin.errors import (AttachError, NumericalError, PolicyError, PruningError,
                                 StateError, TargetingError)
from prune_plugin.optimizer import PruningOptimizer
from prune_plugin.policy import PruningPolicy
from prune_plugin.pruner import (Pruner, attach, detach, finalize, finalized_state_dict,
                                 get_pruner)
from prune_plugin.report import SparsityReport, sparsity_report
from prune_plugin.state import load_pruning_state, save_pruning_state

__version__ = "0.3.0"


def __getattr__(name: str) -> object:
    # load_shrunk needs transformers: it lives in the integrations, imported when first used
    if name == "load_shrunk":
        from prune_plugin.integrations.hub import load_shrunk

        return load_shrunk
    raise AttributeError(f"module 'prune_plugin' has no attribute {name!r}")

__all__ = [
    "AttachError",
    "NumericalError",
    "PolicyError",
    "Pruner",
    "PruningError",
    "PruningOptimizer",
    "PruningPolicy",
    "SparsityReport",
    "StateError",
    "TargetingError",
    "attach",
    "detach",
    "finalize",
    "finalized_state_dict",
    "get_pruner",
    "load_pruning_state",
    "load_shrunk",
    "save_pruning_state",
    "sparsity_report",
]
