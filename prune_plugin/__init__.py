"""prune_plugin: movement pruning (Sanh, Wolf & Rush, 2020) for any PyTorch training loop.

    optimizer = PruningOptimizer(torch.optim.AdamW(model.parameters()), policy, model=model)
"""

from prune_plugin.errors import (AttachError, PolicyError, PruningError, StateError,
                                 TargetingError)
from prune_plugin.hooks import attach, detach, finalize, get_attachment
from prune_plugin.optimizer import PruningOptimizer
from prune_plugin.policy import PruningPolicy
from prune_plugin.report import SparsityReport, sparsity_report
from prune_plugin.state import load_pruning_state, save_pruning_state

__version__ = "0.1.0"

__all__ = [
    "AttachError",
    "PolicyError",
    "PruningError",
    "PruningOptimizer",
    "PruningPolicy",
    "SparsityReport",
    "StateError",
    "TargetingError",
    "attach",
    "detach",
    "finalize",
    "get_attachment",
    "load_pruning_state",
    "save_pruning_state",
    "sparsity_report",
]
