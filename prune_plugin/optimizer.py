"""`PruningOptimizer`: wraps any torch optimizer; each ``step()`` also advances the schedule.

It *is* a ``torch.optim.Optimizer`` (DeepSpeed and transformers check with ``isinstance``) but
delegates everything to the wrapped one: ``param_groups``, ``state`` and ``defaults`` are the
wrapped optimizer's own objects (with setters, since ZeRO swaps ``param_groups``), so LR
schedulers, ``GradScaler``, gradient clipping and accumulation work unchanged.

The scores live in one extra param group of the wrapped optimizer, tagged
``{"prune_plugin": "scores"}`` (found by tag, never by index), with the score learning rate
and no weight decay.

The soft-movement and L0 penalties, lambda * mean(R(S)), are added to the score gradients
here, right before the wrapped step, instead of to the user's loss: the loss stays the
user's, the penalty counts once per real optimizer step whatever the gradient accumulation,
and it sees gradients already unscaled by ``GradScaler``. The penalty is a sum of per-score
terms, so its gradient is elementwise and works on any shard of the scores.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prune_plugin.errors import StateError
from prune_plugin.hooks import Attachment, attach, get_attachment
from prune_plugin.masks import regularizer_grad
from prune_plugin.policy import PruningPolicy
from prune_plugin.schedule import lambda_at

SCORE_GROUP_TAG = "prune_plugin"
STATE_FORMAT_VERSION = 1


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


class PruningOptimizer(torch.optim.Optimizer):
    """``PruningOptimizer(torch.optim.AdamW(model.parameters()), policy, model=model)``.

    Attaches ``policy`` to ``model`` (scores, hooks, masks) and prunes as training steps.
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
        # What torch.optim.Optimizer.__init__ sets, minus the param groups (delegated).
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self.optimizer = optimizer
        self.policy = policy
        self.step_count = 0
        #: False when an integration advances the schedule itself (DeepSpeed steps this
        #: optimizer once per param group; the engine's real steps drive the schedule).
        self.advance_on_step = True

        existing = get_attachment(model)
        if existing is not None and existing.policy == policy:  # live: close() detaches it
            self.attachment = existing  # attached beforehand, e.g. by an integration
        else:
            self.attachment = attach(model, policy)
        try:
            self._add_score_group()
        except BaseException:
            if existing is None:
                self.attachment.close()
            raise
        self.attachment.on_close(self._drop_score_group)

    # -- delegation ------------------------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
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
                f"layers={len(self.attachment.layers)}, optimizer={self.optimizer!r})")

    # -- score group -----------------------------------------------------------------------------

    def score_group(self) -> dict[str, Any] | None:
        for group in self.optimizer.param_groups:
            if group.get(SCORE_GROUP_TAG) == "scores":
                return group
        return None

    def _add_score_group(self) -> None:
        scores = self.attachment.scores
        if not scores:
            return  # magnitude pruning learns no scores
        held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        if any(id(s) in held for s in scores):
            raise ValueError("the wrapped optimizer already holds the pruning scores (it was "
                             "built from model.parameters() after attaching). Fix: build the "
                             "optimizer before attaching; PruningOptimizer adds the scores.")
        group: dict[str, Any] = {"params": scores, "lr": self.policy.score_lr,
                                 SCORE_GROUP_TAG: "scores"}
        if "weight_decay" in self.optimizer.defaults:
            group["weight_decay"] = 0.0
        self.optimizer.add_param_group(group)

    def _drop_score_group(self) -> None:
        group = self.score_group()
        if group is not None:
            for p in group["params"]:
                self.optimizer.state.pop(p, None)
            self.optimizer.param_groups.remove(group)

    # -- stepping --------------------------------------------------------------------------------

    @property
    def current_lambda(self) -> float:
        p = self.policy
        if not p.is_regularized:
            return 0.0
        return lambda_at(self.step_count, final_lambda=p.final_lambda, schedule=p.lambda_schedule,
                         warmup_steps=p.warmup_steps, cooldown_steps=p.cooldown_steps,
                         total_steps=p.total_steps)

    def add_regularizer_grads(self) -> None:
        """Add d(lambda * mean R(S))/dS to the score gradients (soft movement and L0).

        It works on whatever the score group holds at this moment: the scores themselves, or
        the flat fp32 shards that ZeRO swaps in for the one group it is stepping (and nothing
        while it steps another group), so the penalty counts once per element per step."""
        lam = self.current_lambda
        group = self.score_group()
        if lam == 0.0 or group is None:
            return
        p = self.policy
        scale = lam / sum(layer.numel for layer in self.attachment.layers)
        with torch.no_grad():
            for s in group["params"]:
                g = regularizer_grad(s.detach(), method=p.method, beta=p.l0_beta, left=p.l0_left,
                                     right=p.l0_right).mul_(scale)
                if s.grad is None:
                    s.grad = g
                else:
                    s.grad.add_(g)

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        if self.attachment.closed:
            raise RuntimeError("the model was detached or finalized; this PruningOptimizer has "
                               "nothing left to prune. Fix: keep training with the wrapped "
                               "optimizer (`.optimizer`).")
        if closure is None:
            self.add_regularizer_grads()
            loss = self.optimizer.step()
        else:
            def with_penalty() -> Any:
                with torch.enable_grad():
                    value = closure()
                self.add_regularizer_grads()
                return value
            loss = self.optimizer.step(with_penalty)
        if self.advance_on_step:
            self.advance()
        return loss

    def advance(self, steps: int = 1) -> None:
        """Count ``steps`` optimizer steps and refresh the masks when due."""
        self.step_count += steps
        if self.step_count % self.policy.mask_update_every == 0:
            self.attachment.update_masks(self.step_count)

    # -- state -----------------------------------------------------------------------------------

    def pruning_state_dict(self) -> dict[str, Any]:
        """Step, policy, scores and masks, keyed by module name."""
        layers = self.attachment.layers
        return {
            "format_version": STATE_FORMAT_VERSION,
            "step": self.step_count,
            "policy": self.policy.to_json(),
            "scores": {lay.name: lay.scores.detach() for lay in layers if lay.scores is not None},
            "masks": {lay.name: lay.mask for lay in layers if lay.mask is not None},
            "layers": [lay.name for lay in layers],
        }

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizer": self.optimizer.state_dict(), "pruning": self.pruning_state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        if not isinstance(state_dict, Mapping) or "pruning" not in state_dict \
                or "optimizer" not in state_dict:
            raise StateError("not a PruningOptimizer state dict (it lacks 'optimizer' and "
                             "'pruning'). Fix: pass what PruningOptimizer.state_dict() "
                             "returned; a plain optimizer's state goes to `.optimizer`.")
        pruning = state_dict["pruning"]
        check_pruning_state(self.attachment, pruning)
        self.optimizer.load_state_dict(state_dict["optimizer"])
        apply_pruning_state(self.attachment, pruning)
        self.step_count = int(pruning["step"])


def find_pruning_optimizer(optimizer: Any) -> PruningOptimizer | None:
    """The PruningOptimizer inside whatever wrappers (accelerate, DeepSpeed) hold it."""
    for _ in range(8):
        if optimizer is None or isinstance(optimizer, PruningOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def check_saved_policy(saved_json: str, policy: PruningPolicy) -> None:
    """Refuse pruning state saved with another policy, naming the fields that differ."""
    saved = PruningPolicy.model_validate_json(saved_json)
    if saved != policy:
        diff = [f"{k}: saved {getattr(saved, k)!r} vs current {getattr(policy, k)!r}"
                for k in PruningPolicy.model_fields if getattr(saved, k) != getattr(policy, k)]
        raise StateError("pruning state was saved with another policy (" + "; ".join(diff)
                         + "). Fix: attach with the saved policy to resume.")


def check_pruning_state(attachment: Attachment, pruning: Mapping[str, Any]) -> None:
    """Refuse saved pruning state that does not fit; changes nothing."""
    version = pruning.get("format_version")
    if version != STATE_FORMAT_VERSION:
        raise StateError(f"pruning state has format_version {version!r}; this prune_plugin "
                         f"reads {STATE_FORMAT_VERSION}. Fix: save it again with this version.")
    check_saved_policy(pruning["policy"], attachment.policy)
    layers = attachment.named_layers()
    if list(pruning["layers"]) != list(layers):
        missing = sorted(set(pruning["layers"]) - set(layers))
        extra = sorted(set(layers) - set(pruning["layers"]))
        raise StateError(f"pruning state covers other modules (saved only: {missing[:5]}, model "
                         f"only: {extra[:5]}). Fix: load it into the model it was saved from.")
    for kind in ("scores", "masks"):
        for name, tensor in pruning[kind].items():
            shape = tuple(layers[name].weight.shape)
            if tuple(tensor.shape) != shape:
                raise StateError(f"saved {kind} of {name!r} have shape {tuple(tensor.shape)}, "
                                 f"the model's weight {shape}. Fix: load into the same model.")
    if attachment.policy.has_scores and set(pruning["scores"]) != set(layers):
        raise StateError("pruning state lacks scores for some layers. Fix: save it again.")


def apply_pruning_state(attachment: Attachment, pruning: Mapping[str, Any]) -> None:
    layers = attachment.named_layers()
    with torch.no_grad():
        for name, layer in layers.items():
            if name in pruning["scores"]:
                layer.scores.copy_(pruning["scores"][name])
            mask = pruning["masks"].get(name)
            layer.set_mask(None if mask is None else mask.to(layer.weight.device, torch.bool))
