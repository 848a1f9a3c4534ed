"""`PruningOptimizer`: wraps any torch optimizer; each real step also advances the pruning run.

It *is* a ``torch.optim.Optimizer`` (DeepSpeed and transformers check with ``isinstance``) but
delegates everything to the wrapped one: ``param_groups``, ``state`` and ``defaults`` are the
wrapped optimizer's own objects (with setters, since ZeRO swaps ``param_groups``), so LR
schedulers built on it, ``GradScaler``, gradient clipping and accumulation work unchanged.

The scores live in one extra param group of the wrapped optimizer, tagged
``{"prune_plugin": "scores"}`` (found by tag, never by index), with no weight decay. Its
learning rate keeps its ratio to the weights': before each step it is set to ``score_lr`` times
the first weight group's learning rate over that group's learning rate when wrapped, so any LR
scheduler (warm-up and decay, OneCycleLR, CyclicLR, ones that set absolute values) moves the
scores' rate with the weights' and none can silently replace ``score_lr``.

What it adds, through a pre- and a post-step hook on the innermost torch optimizer (the one
that really updates the parameters, under any wrappers such as accelerate's):

- **the penalty** of soft movement and L0, lambda * mean(R(S)), added to the score gradients
  right before the real update: the loss stays the user's, it counts once per real step
  whatever the accumulation, and it sees gradients already unscaled by ``GradScaler``;
- **the step count**: the pruner advances only when the inner update really ran, not on an
  accumulation micro-step that accelerate skips, nor on a ``GradScaler`` step skipped for
  infs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import weakref

import torch
from torch import nn

from prune_plugin.distributed import unwrap_ddp
from prune_plugin.errors import AttachError, StateError
from prune_plugin.policy import PruningPolicy
from prune_plugin.pruner import Pruner, attach, get_pruner

SCORE_GROUP_TAG = "prune_plugin"
#: Key, in the score group, of the first weight group's learning rate when wrapped.
BASE_LR_KEY = "prune_plugin_base_lr"


def as_policy(policy: PruningPolicy | Mapping[str, Any] | str | Path) -> PruningPolicy:
    """Accept a policy, a mapping of its fields, or the path of a JSON/YAML file."""
    if isinstance(policy, PruningPolicy):
        return policy
    if isinstance(policy, Mapping):
        return PruningPolicy.from_dict(dict(policy))
    if isinstance(policy, (str, Path)):
        return PruningPolicy.from_file(policy)
    raise TypeError(f"policy must be a PruningPolicy, a mapping or a file path, got "
                    f"{type(policy).__name__}")


def _innermost(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that really updates the parameters, under wrappers (accelerate's
    AcceleratedOptimizer and the like keep it as ``.optimizer``)."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            return optimizer
        optimizer = inner
    return optimizer


def _refuse_schedulers(optimizer: torch.optim.Optimizer) -> None:
    """An LR scheduler built before wrapping knows one learning rate per existing group: the
    scores' group would make torch raise at its next step (or stay unscheduled)."""
    o: Any = optimizer
    for _ in range(8):
        if getattr(getattr(o, "step", None), "_wrapped_by_lr_sched", False):
            raise AttachError(
                "an LR scheduler was already built on this optimizer. PruningOptimizer adds a "
                "param group for the pruning scores, which that scheduler does not know: torch "
                "raises at its next step (strict zip), or leaves the scores' learning rate "
                "unscheduled. Fix: wrap first, then build the scheduler on the wrapper, e.g. "
                "`optimizer = PruningOptimizer(base, policy, model=model)` and "
                "`get_linear_schedule_with_warmup(optimizer, ...)`; it then schedules the "
                "scores' learning rate too, as the paper's code does.")
        o = getattr(o, "optimizer", None)
        if o is None:
            return


class PruningOptimizer(torch.optim.Optimizer):
    """``PruningOptimizer(torch.optim.AdamW(model.parameters()), policy, model=model)``.

    Attaches ``policy`` to ``model`` (scores, forwards, masks), or takes the pruner already
    attached with that policy, and tells it about every real optimizer step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer,
                 policy: PruningPolicy | Mapping[str, Any] | str | Path, *,
                 model: nn.Module) -> None:
        if isinstance(optimizer, PruningOptimizer):
            raise TypeError("optimizer is already a PruningOptimizer; wrap the plain optimizer.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        policy = as_policy(policy)
        _refuse_schedulers(optimizer)
        # What torch.optim.Optimizer.__init__ sets, minus the param groups (delegated).
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self.optimizer = optimizer
        #: False when an integration reports the steps itself (DeepSpeed steps this optimizer
        #: once per param group; the engine's schedule slot tells the pruner).
        self.counts_steps = True
        self._inner_hooks: list[Any] = []
        self._inner_stepped = False
        self._penalty_in_closure = False

        pruner = get_pruner(model)
        attached_here = pruner is None
        if pruner is not None and pruner.policy != policy:
            raise AttachError("this model is already attached with another policy. Fix: "
                              "prune_plugin.detach(model) first, or wrap with the same policy.")
        if pruner is not None and (driver := pruner.driver and pruner.driver()) is not None:
            raise AttachError(
                f"this model's pruning is already driven by a PruningOptimizer (around "
                f"{type(driver.optimizer).__name__}); a second one would advance the schedule "
                "again at each of its steps (two steps per iteration). Fix: wrap one optimizer "
                "only, the one that steps once per iteration, and step the other unwrapped; to "
                "replace the optimizer, call close() on the old wrapper first (without it: "
                "prune_plugin.get_pruner(model).driver().close()).")
        if pruner is None:
            pruner = attach(model, policy)
        self.pruner: Pruner = pruner
        try:
            ddp = unwrap_ddp(model)[1]
            if ddp is not None:  # attached before DDP was built, or after: both average
                pruner.follow_ddp(ddp)
            self._add_score_group()
        except BaseException:
            if attached_here:
                pruner.detach()
            raise
        self._hook_inner()
        pruner.driver = weakref.ref(self)
        pruner.on_detach(_weakly(self._drop_score_group))

    @property
    def policy(self) -> PruningPolicy:
        return self.pruner.policy

    @property
    def step_count(self) -> int:
        return self.pruner.step_count

    # -- delegation ------------------------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return (f"PruningOptimizer(method={self.policy.method!r}, step={self.step_count}, "
                f"layers={len(self.pruner.layers)}, optimizer={self.optimizer!r})")

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults/state/param_groups, which are delegated.
        state = dict(self.__dict__)
        state["_inner_hooks"] = []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)  # a copy: its inner optimizer has lost our hooks
        self._patch_step_function()
        self._hook_inner()
        if self.pruner.driver is None:  # the copy's own pruner (a deepcopy of both)
            self.pruner.driver = weakref.ref(self)
        self.pruner.on_detach(_weakly(self._drop_score_group))

    # -- score group -----------------------------------------------------------------------------

    def score_group(self) -> dict[str, Any] | None:
        for group in self.optimizer.param_groups:
            if group.get(SCORE_GROUP_TAG) == "scores":
                return group
        return None

    def _add_score_group(self) -> None:
        scores = self.pruner.scores
        if not scores:
            return  # magnitude pruning learns no scores
        inner = _innermost(self.optimizer)
        if isinstance(inner, torch.optim.LBFGS):
            raise AttachError(
                f"torch.optim.LBFGS takes exactly one param group, and {self.policy.method} "
                "pruning adds one for its scores. Fix: method 'magnitude' (it learns no "
                "scores), or an optimizer that takes param groups (AdamW, SGD).")
        ids = {id(s) for s in scores}
        holding = [g for g in self.optimizer.param_groups if any(id(p) in ids for p in g["params"])]
        if len(holding) == 1 and {id(p) for p in holding[0]["params"]} == ids:
            holding[0][SCORE_GROUP_TAG] = "scores"  # the user gave the scores a group of their own
            return
        for group in holding:  # built from model.parameters() after attaching: move them out
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        score_lr = getattr(self.policy, "score_lr", None)  # (every method with scores has one)
        group = {"params": scores, "lr": score_lr, SCORE_GROUP_TAG: "scores"}
        first = self._weight_group()
        if first is not None and _positive(first.get("lr")):
            group[BASE_LR_KEY] = float(first["lr"])
        defaults = self.optimizer.defaults
        if "weight_decay" in defaults:
            group["weight_decay"] = 0.0
        if defaults.get("relative_step"):  # Adafactor would ignore lr: give it score_lr
            group.update(relative_step=False, scale_parameter=False, warmup_init=False)
        self.optimizer.add_param_group(group)

    def close(self) -> None:
        """Stop driving the pruning run, keeping it attached: the scores leave the wrapped
        optimizer, and a new PruningOptimizer (say, around a rebuilt optimizer) can take over
        with the run's step, scores and masks."""
        self._drop_score_group()
        if self.pruner.driver is not None and self.pruner.driver() is self:
            self.pruner.driver = None

    def _weight_group(self) -> dict[str, Any] | None:
        return next((g for g in self.optimizer.param_groups if SCORE_GROUP_TAG not in g), None)

    def follow_weight_lr(self) -> None:
        """Set the scores' learning rate to score_lr x (the first weight group's lr / its lr when
        wrapped): whatever a scheduler wrote into the score group is replaced."""
        group, first = self.score_group(), self._weight_group()
        score_lr = getattr(self.policy, "score_lr", None)  # (magnitude: no scores)
        if group is None or first is None or BASE_LR_KEY not in group or score_lr is None:
            return
        lr = first.get("lr")
        if lr is not None and _positive(lr):
            group["lr"] = score_lr * float(lr) / group[BASE_LR_KEY]

    def _drop_score_group(self) -> None:
        group = self.score_group()
        if group is not None:
            for p in group["params"]:
                self.optimizer.state.pop(p, None)
            self.optimizer.param_groups.remove(group)
        for handle in self._inner_hooks:
            handle.remove()
        self._inner_hooks = []

    # -- stepping --------------------------------------------------------------------------------

    def _hook_inner(self) -> None:
        inner = _innermost(self.optimizer)
        if hasattr(inner, "register_step_pre_hook") and \
                hasattr(inner, "_optimizer_step_pre_hooks"):
            self._inner_hooks = [inner.register_step_pre_hook(self._before_update),
                                 inner.register_step_post_hook(self._after_update)]

    def _before_update(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._penalty_in_closure:
            self.add_penalty_grads()

    def _after_update(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._inner_stepped = True

    def add_penalty_grads(self) -> None:
        """Add d(lambda * mean R(S))/dS to whatever the score group holds at this moment: the
        scores themselves, or the flat fp32 shards that ZeRO swaps in for the one group it is
        stepping (and nothing while it steps another group), so the penalty counts once per
        element per step."""
        group = self.score_group()
        if group is not None:
            self.pruner.add_penalty_grads(group["params"])

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        if not self.pruner.closed and (self.pruner.driver is None
                                       or self.pruner.driver() is not self):
            raise RuntimeError("this PruningOptimizer was closed; another one drives the run. "
                               "Fix: step the new wrapper.")
        if self.pruner.closed:
            raise RuntimeError("the model was detached or finalized; this PruningOptimizer has "
                               "nothing left to prune. Fix: keep training with the wrapped "
                               "optimizer (`.optimizer`).")
        hooked = bool(self._inner_hooks)
        self._inner_stepped = False
        self.follow_weight_lr()
        if closure is None:
            if not hooked:
                self.add_penalty_grads()
            loss = self.optimizer.step()
        else:
            def with_penalty() -> Any:  # each evaluation's gradients get the penalty
                with torch.enable_grad():
                    value = closure()
                self.add_penalty_grads()
                return value
            self._penalty_in_closure = True
            try:
                loss = self.optimizer.step(with_penalty)
            finally:
                self._penalty_in_closure = False
        if self.counts_steps and (self._inner_stepped or not hooked):
            self.pruner.step()
        return loss

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "pruning": self.pruner.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if not isinstance(state_dict, Mapping) or "pruning" not in state_dict \
                or "optimizer" not in state_dict:
            raise StateError("not a PruningOptimizer state dict (it lacks 'optimizer' and "
                             "'pruning'). Fix: pass what PruningOptimizer.state_dict() "
                             "returned; a plain optimizer's state goes to `.optimizer`.")
        self.pruner.check_state(state_dict["pruning"])
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.pruner.load_state_dict(state_dict["pruning"])


def _weakly(method: Callable[[], None]) -> Callable[[], None]:
    """A callback that does not keep its object alive (the pruner outlives a dropped
    wrapper, which a new one may then replace)."""
    ref = weakref.WeakMethod(method)

    def call() -> None:
        bound = ref()
        if bound is not None:
            bound()
    return call


def _positive(lr: Any) -> bool:
    """A plain positive learning rate (a tensor lr is left alone: reading it would sync)."""
    return isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0


def find_pruning_optimizer(optimizer: Any) -> PruningOptimizer | None:
    """The PruningOptimizer inside whatever wrappers (accelerate, DeepSpeed) hold it."""
    for _ in range(8):
        if optimizer is None or isinstance(optimizer, PruningOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None
