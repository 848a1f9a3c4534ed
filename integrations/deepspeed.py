"""DeepSpeed: the pruning policy as an entry of the DeepSpeed JSON config, ZeRO stages 0-3.

    from prune_plugin.integrations.deepspeed import initialize
    engine, optimizer, _, scheduler = initialize(model=model, optimizer=torch.optim.AdamW(...),
                                                 config="ds_config.json")

with ``"movement_pruning": {...policy fields...}`` in the config; then the usual ``engine(x)``,
``engine.backward(loss)``, ``engine.step()`` loop under ``deepspeed`` or ``torchrun``.

How pruning fits into the engine:

- **Scores** are Parameters of each pruned Linear, created before the engine is built, so
  ZeRO-3 partitions them like the weight, and they and their optimizer state are sharded,
  gathered and checkpointed like any parameter (also under ``zero.Init``: each layer is
  gathered alone to size its scores, which are then partitioned right away).
- **The optimizer** is wrapped in :class:`PruningOptimizer`; ZeRO steps it once per param
  group with flat fp32 shards swapped in, so the penalty gradient is added to whatever shard
  the score group holds, and the wrapper's ``step()`` does not count steps.
- **The steps** are reported to the pruner from the engine's ``lr_scheduler`` slot
  (:class:`PruningSchedule`): DeepSpeed calls it once per applied optimizer step, not on
  accumulation micro-steps nor on fp16 overflow, and saves and restores it with every
  checkpoint.
- **Masks under ZeRO-3** are never held whole between forwards: after each step an exact
  sharded Top-v (:func:`prune_plugin.selection.topv_thresholds`, a radix select with one
  small all-reduce per digit, its decisions kept on the device) gives each layer a threshold,
  and each forward rebuilds the mask from the gathered scores (the gate is decided inside the
  layer's forward, after DeepSpeed's gather hooks). Under ZeRO 0-2 the parameters are whole
  on every rank and each rank computes the same masks locally.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prune_plugin.errors import PolicyError, PruningError
from prune_plugin.masks import effective_weight
from prune_plugin.hooks import SCORES_NAME, PrunedLayer
from prune_plugin.optimizer import PruningOptimizer, find_pruning_optimizer
from prune_plugin.policy import PruningPolicy
from prune_plugin.distributed import Sharding, is_zero_partitioned, zero_slice
from prune_plugin.pruner import Pruner, attach, check_saved_policy, get_pruner
from prune_plugin.report import SparsityReport
from prune_plugin.report import sparsity_report as core_sparsity_report

#: The top-level key of the DeepSpeed config that holds the pruning policy.
CONFIG_KEY = "movement_pruning"
_BOUND_ATTR = "_prune_plugin_schedule"


class DeepSpeedConfigError(PruningError, ValueError):
    """The DeepSpeed config cannot run pruning as given."""


# -- config -------------------------------------------------------------------------------------

def load_config(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config as a fresh dict, from a dict or a JSON file path."""
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    path = Path(config)
    if not path.is_file():
        raise DeepSpeedConfigError(f"DeepSpeed config {str(path)!r} does not exist. Fix: pass "
                                   "the path of the JSON file or the config dict.")
    try:
        loaded = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DeepSpeedConfigError(f"DeepSpeed config {str(path)!r} is not valid JSON: {err}"
                                   ) from None
    if not isinstance(loaded, dict):
        raise DeepSpeedConfigError(f"DeepSpeed config {str(path)!r} holds a "
                                   f"{type(loaded).__name__}, not a JSON object.")
    return loaded


def read_policy(config: Mapping[str, Any]) -> PruningPolicy | None:
    """The policy of the config's ``movement_pruning`` entry (None when there is none).

    Validated by the same pydantic model as everywhere, so errors name the field, the value
    and the fix. Whole numbers given for float fields are accepted, as everywhere (DeepSpeed's
    own parser writes 1.0 as 1)."""
    entry = config.get(CONFIG_KEY)
    if entry is None:
        return None
    if not isinstance(entry, Mapping):
        raise DeepSpeedConfigError(f"DeepSpeed config entry {CONFIG_KEY!r} must be an object of "
                                   f"policy fields, got {type(entry).__name__}.")
    policy = PruningPolicy.from_dict(dict(entry), source=f"DeepSpeed config entry {CONFIG_KEY!r}")
    if policy.mask_update_every != 1:
        raise PolicyError(f"DeepSpeed config entry {CONFIG_KEY!r}: mask_update_every is "
                          f"{policy.mask_update_every}; under DeepSpeed masks are refreshed "
                          "after every optimizer step. Fix: remove mask_update_every.")
    return policy


def _zero_stage(config: Mapping[str, Any]) -> int:
    return int((config.get("zero_optimization") or {}).get("stage", 0))


_WHY_REFUSED = {
    "optimizer": "DeepSpeed would build its own optimizer, which cannot carry the pruning "
                 "scores' param group",
    "scheduler": "DeepSpeed's schedulers give every param group one learning rate, the pruning "
                 "scores' included"}


def refuse_blocks(config: Mapping[str, Any], blocks: tuple[str, ...], fix: str) -> None:
    """Raise if the DeepSpeed config has one of ``blocks`` ('optimizer', 'scheduler')."""
    for block in blocks:
        if block in config:
            raise DeepSpeedConfigError(f"the DeepSpeed config has an {block!r} block: "
                                       f"{_WHY_REFUSED[block]}. Fix: remove the block; {fix}")


_TORCH_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
                     "sgd": torch.optim.SGD}


def _client_optimizer(model: nn.Module, optimizer: Any, config: dict[str, Any]
                      ) -> torch.optim.Optimizer:
    """The optimizer to wrap: the caller's, or a torch one built from the config's block."""
    block = config.pop("optimizer", None)
    if optimizer is not None:
        if block is not None:
            raise DeepSpeedConfigError("both optimizer=... and an 'optimizer' block in the "
                                       "DeepSpeed config were given. Fix: keep one of them.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer instance, got "
                            f"{type(optimizer).__name__} (DeepSpeed refuses callables and "
                            "duck-typed optimizers with pruning).")
        return optimizer
    if block is None:
        raise DeepSpeedConfigError("no optimizer: pass optimizer=torch.optim.AdamW(...) or give "
                                   "the DeepSpeed config an 'optimizer' block.")
    kind = str(block.get("type", "")).lower()
    if kind not in _TORCH_OPTIMIZERS:
        raise DeepSpeedConfigError(
            f"the DeepSpeed config's optimizer type {block.get('type')!r} cannot carry the "
            f"pruning scores' param group; supported here: Adam, AdamW, SGD (built as torch "
            "optimizers). Fix: use one of them or pass optimizer=... yourself.")
    params = dict(block.get("params") or {})
    params.pop("torch_adam", None)
    params.pop("adam_w_mode", None)
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    return _TORCH_OPTIMIZERS[kind]([p for p in model.parameters() if p.requires_grad],
                                   **params)


# -- the engine's lr_scheduler slot --------------------------------------------------------------

class PruningSchedule:
    """Occupies the engine's ``lr_scheduler`` slot: steps the user's scheduler (if any), then
    tells the pruner that a real optimizer step happened.

    DeepSpeed calls ``step()`` once per applied optimizer step and saves ``state_dict()`` in
    every checkpoint, which makes it the one place that sees real steps. Anything else is
    delegated to the wrapped scheduler.
    """

    def __init__(self, scheduler: Any, pruner: Pruner, optimizer: PruningOptimizer) -> None:
        self.scheduler = scheduler
        self.pruner = pruner
        self.optimizer = optimizer

    def step(self, *args: Any, **kwargs: Any) -> None:
        if self.scheduler is not None:
            self.scheduler.step(*args, **kwargs)
        # ZeRO-1/2 show the optimizer one group at a time while stepping: here all are seen
        self.optimizer.follow_weight_lr()
        self.pruner.step()

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "prune_plugin_step": self.pruner.step_count,
                "prune_plugin_policy": self.pruner.policy.to_json()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "prune_plugin_step" not in state:
            raise PruningError("this checkpoint's lr_scheduler state has no pruning step (it "
                               "was not saved by a pruning engine). Fix: load a checkpoint "
                               "saved with prune_plugin.integrations.deepspeed.")
        check_saved_policy(state["prune_plugin_policy"], self.pruner.policy)
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        # masks are refreshed once the engine has loaded the parameters too (see bind)
        self.pruner.step_count = int(state["prune_plugin_step"])

    def get_last_lr(self) -> list[float]:
        if self.scheduler is not None:
            return self.scheduler.get_last_lr()
        return [g["lr"] for g in self.optimizer.param_groups]

    def __getattr__(self, name: str) -> Any:
        scheduler = self.__dict__.get("scheduler")
        if scheduler is None:
            raise AttributeError(name)
        return getattr(scheduler, name)


# -- ZeRO-3 shards ------------------------------------------------------------------------------

class ZeroSharding(Sharding):
    """ZeRO-3's partitions: each rank holds an equal flat slice of every parameter (the last
    one padded), and sums run over ZeRO's data-parallel group."""

    shards = True
    name = "ZeRO-3"
    refresh_after_load = False  # the engine's load_checkpoint refreshes (see bind)

    def __init__(self, group: Any) -> None:
        self.group = group
        self._all_reduce = _all_reduce_for(group)

    def local(self, t: Tensor) -> Tensor:
        return zero_slice(t)[0]

    def all_reduce(self, t: Tensor) -> None:
        self._all_reduce(t)


def _zero3_sharding(model: nn.Module) -> ZeroSharding:
    """How the core reaches this rank's shards and sums across ZeRO-3's data-parallel group."""
    return ZeroSharding(next(p.ds_process_group for p in model.parameters()
                             if is_zero_partitioned(p)))


def _all_reduce_for(group: Any):
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().current_device_name())

    def all_reduce(t: Tensor) -> None:
        on_device = t.to(device)
        dist.all_reduce(on_device, group=group)
        t.copy_(on_device)
    return all_reduce


def _gathered(layer: PrunedLayer):
    """Context: the layer's own parameters whole (ZeRO-3), or a no-op."""
    return _gathered_params(list(layer.module.parameters(recurse=False)))


def _gathered_params(params: list[Tensor]):
    """Context: ``params`` whole on every rank (ZeRO-3), or a no-op for unpartitioned ones."""
    import deepspeed

    params = [p for p in params if is_zero_partitioned(p)]
    if not params:
        return nullcontext()
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def attach_partitioned(model: nn.Module, policy: PruningPolicy) -> Pruner:
    """Attach to a model whose weights ZeRO-3 already partitioned (built under ``zero.Init``,
    e.g. ``from_pretrained`` with a ZeRO-3 config): each layer is gathered alone to build its
    scores, which are partitioned at once, like the weight."""

    def make_scores(layer: PrunedLayer) -> Tensor:
        with _gathered(layer):
            scores = nn.Parameter(layer.state.method.scores(layer), requires_grad=True)
        layer.weight.convert_to_zero_parameters([scores])
        return scores

    return attach(model, policy, score_factory=make_scores, sharding=_zero3_sharding(model))


def attach_if_partitioned(model: nn.Module, policy: PruningPolicy) -> bool:
    """:func:`attach_partitioned` when the model's weights are ZeRO-3 partitioned and nothing
    is attached yet (the plain ``PruningOptimizer`` attaches otherwise); True if it did."""
    if get_pruner(model) is not None or \
            not any(is_zero_partitioned(p) for p in model.parameters()):
        return False
    attach_partitioned(model, policy)
    return True


# -- binding to an engine -----------------------------------------------------------------------

def bind(engine: Any) -> PruningSchedule:
    """Fit a built engine for pruning (idempotent); ``initialize`` calls it.

    Integrations that build the engine themselves (the transformers Trainer) call this after
    ``deepspeed.initialize``: it takes over the ``lr_scheduler`` slot, switches ZeRO-3 to
    sharded Top-v, and makes ``load_checkpoint`` refresh the masks from the loaded scores."""
    bound = getattr(engine, _BOUND_ATTR, None)
    if bound is not None:
        return bound
    optimizer = _optimizer_of(engine)
    pruner = optimizer.pruner
    scheduler = engine.lr_scheduler
    if scheduler is not None and not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        inner = getattr(scheduler, "scheduler", None)  # accelerate's wrapper
        if not isinstance(inner, torch.optim.lr_scheduler.LRScheduler):
            raise DeepSpeedConfigError(
                f"the engine's lr scheduler is {type(scheduler).__name__}, which gives every "
                "param group one learning rate, the pruning scores' included. Fix: remove the "
                "DeepSpeed config's 'scheduler' block and use a torch scheduler.")
    optimizer.counts_steps = False  # ZeRO steps it once per param group
    if engine.zero_optimization_stage() == 3:
        pruner.use_sharding(_zero3_sharding(engine.module))
        import deepspeed

        for group in pruner.units:  # every member's forward reads the owner's unit scores
            if group.scores is not None:
                for member in group.members[1:]:
                    deepspeed.zero.register_external_parameter(member.layer.module,
                                                               group.scores)
    schedule = PruningSchedule(scheduler, pruner, optimizer)
    engine.lr_scheduler = schedule
    load_checkpoint = engine.load_checkpoint

    def load_and_refresh(*args: Any, **kwargs: Any) -> Any:
        result = load_checkpoint(*args, **kwargs)
        if kwargs.get("load_lr_scheduler_states", True) is False:
            pruner.step_count = engine.global_steps - engine.skipped_steps
        pruner.refresh()
        return result
    engine.load_checkpoint = load_and_refresh
    pruner.refresh()
    setattr(engine, _BOUND_ATTR, schedule)
    return schedule


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
               config: str | Path | Mapping[str, Any] | None = None,
               lr_scheduler: Any = None, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` with pruning from the config's ``movement_pruning`` entry.

    Same arguments and return value as ``deepspeed.initialize`` (``config`` a path or dict).
    The entry is validated before anything is allocated; if the engine cannot be built, the
    model is detached again, as it was."""
    import deepspeed

    if config is None:
        raise DeepSpeedConfigError("config is required: the DeepSpeed JSON (path or dict) "
                                   f"with a {CONFIG_KEY!r} entry.")
    cfg = load_config(config)
    policy = read_policy(cfg)
    if policy is None:
        raise DeepSpeedConfigError(f"the DeepSpeed config has no {CONFIG_KEY!r} entry. Fix: add "
                                   f'"{CONFIG_KEY}": {{"method": "movement", ...}} or call '
                                   "deepspeed.initialize directly.")
    refuse_blocks(cfg, ("scheduler",), "pass lr_scheduler=... (a torch scheduler, which keeps "
                  "the score lr).")
    cfg.pop(CONFIG_KEY)
    cfg["zero_allow_untested_optimizer"] = True
    client = _client_optimizer(model, optimizer, cfg)
    attached_here = get_pruner(model) is None
    if attached_here and _zero_stage(cfg) != 3 and \
            any(is_zero_partitioned(p) for p in model.parameters()):
        raise DeepSpeedConfigError("the model was built under deepspeed.zero.Init but the "
                                   "config's ZeRO stage is not 3. Fix: use stage 3.")
    attach_if_partitioned(model, policy)
    try:
        pruner = PruningOptimizer(client, policy, model=model)
        engine, opt, loader, _ = deepspeed.initialize(model=model, optimizer=pruner, config=cfg,
                                                      lr_scheduler=lr_scheduler, **kwargs)
        schedule = bind(engine)
    except BaseException:
        pruner = get_pruner(model)
        if attached_here and pruner is not None:
            pruner.detach()
        raise
    return engine, opt, loader, schedule


# -- reports and export -------------------------------------------------------------------------

def sparsity_report(engine: Any) -> SparsityReport:
    """Remaining weights of the engine's model; a collective under ZeRO-3 (every rank)."""
    return core_sparsity_report(_pruner_of(engine).model)


def finalized_state_dict(engine: Any) -> dict[str, Tensor]:
    """The model's plain state dict with ``W * M`` baked in and no scores, in fp32 (the
    master weights under ZeRO), whole on every rank: what ``save_pretrained(state_dict=...)``
    of the finalized model writes. A collective: call it on every rank."""
    from deepspeed.utils import safe_get_full_fp32_param

    pruner = _pruner_of(engine)
    module = engine.module
    by_weight = {id(layer.weight): layer for layer in pruner.layers}
    stage = engine.zero_optimization_stage()
    out: dict[str, Tensor] = {}
    for name, param in module.named_parameters():
        if name.rsplit(".", 1)[-1] == SCORES_NAME:
            continue
        full = safe_get_full_fp32_param(param) if stage > 0 and param.requires_grad else None
        if full is None:
            with _gathered_params([param]):
                full = param.detach().float().clone()
        full = full.detach().float().cpu().clone()
        layer = by_weight.get(id(param))
        if layer is not None:
            with _gathered(layer), torch.no_grad():
                gate = layer.gate()
            if gate is not None:
                full = effective_weight(full, gate.cpu())
        out[name] = full
    for name, buf in module.named_buffers():
        out[name] = buf.detach().cpu().clone()
    return out


def _optimizer_of(engine: Any) -> PruningOptimizer:
    optimizer = find_pruning_optimizer(getattr(engine, "optimizer", None))
    if optimizer is None:
        raise PruningError("this DeepSpeed engine's optimizer is not a PruningOptimizer. Fix: "
                           "build the engine with prune_plugin.integrations.deepspeed."
                           "initialize, or pass optimizer=PruningOptimizer(...) to it.")
    return optimizer


def _pruner_of(engine: Any) -> Pruner:
    pruner = _optimizer_of(engine).pruner
    if pruner.closed:
        raise PruningError("this engine's pruning was detached. Fix: build it with "
                           "prune_plugin.integrations.deepspeed.initialize.")
    return pruner
