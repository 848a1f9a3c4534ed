"""The pruning policy: one strict pydantic v2 model per method, one discriminated union.

``PruningPolicy(method="movement", ...)`` builds the method's own model
(:class:`MagnitudePolicy`, :class:`MovementPolicy`, :class:`SoftMovementPolicy`,
:class:`L0Policy`); each declares exactly the fields its method uses, with their real
defaults, so a field of another method is refused by the type, and validation, dumps and the
JSON schema (:data:`AnyPolicy`) come from the declarations. Built from Python, JSON, YAML or a
DeepSpeed config entry; every error names the field, the value, what is allowed and a fix
(:class:`~prune_plugin.errors.PolicyError`). One unit everywhere: a *remaining* fraction is the
fraction of weights KEPT (the paper's v).

Defaults that depend on an earlier field (soft movement and L0 at a requested
``final_remaining``) are default factories of that field, so they are declared where the field
is. Policies saved by an earlier version load through :func:`migrate`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, TypeAdapter,
                      ValidationError, field_validator, model_serializer, model_validator)

from prune_plugin.errors import PolicyError, policy_error
from prune_plugin.storage import read_policy_file

Method = Literal["magnitude", "movement", "soft_movement", "l0"]
Structure = Literal["unstructured", "neurons", "heads", "hybrid", "blocks"]
UnitKind = Literal["neurons", "heads"]
#: How a fused projection lays out its units (prune_plugin.families.unit_lines).
FusedLayout = Literal["qkv_stacked", "qkv_interleaved", "qkv_grouped", "qkv_multi_query",
                      "halves"]
Scope = Literal["local", "global"]
ScoreInit = Literal["constant", "uniform", "kaiming", "magnitude"]
LambdaSchedule = Literal["cubic", "constant"]
RemainingControl = Literal["lambda", "topv"]
L0GateGradient = Literal["clamped", "straight_through"]
L0WarmupGates = Literal["sampled", "open"]

#: L0's log-alpha start in the paper's code (logit(0.9)): the offset under the |W| ranking of
#: L0 at a requested fraction, so that its gates start open.
L0_OPEN_LOG_ALPHA = 2.197

#: final_lambda's default under remaining_control 'lambda': the most the controller applies.
CONTROLLED_MAX_LAMBDA = 3000.0

#: Output heads left dense by default: the paper prunes the encoder, not the task head.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    r"(^|\.)(classifier|qa_outputs|lm_head|score|pooler|cls|head)(\.|$)",
)


class UnitGroupSpec(BaseModel):
    """Modules whose rows or columns share one score per unit, named relative to a repeated
    block (a Transformer layer): for a neuron, the up-projection's row and the down-projection's
    column; for a head, the query/key/value rows and the output projection's columns."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    kind: UnitKind = Field(description="neurons (FFN units) or heads (attention heads).")
    rows: list[str] = Field(min_length=1, description="Modules (names relative to the block, "
                            "e.g. 'intermediate.dense') whose output rows are split into units.")
    columns: list[str] = Field(min_length=1, description="Modules whose input columns are "
                               "split into the same units (e.g. 'output.dense').")
    units: int | None = Field(None, ge=1, description="Units per block; default for neurons: "
                              "the columns modules' inputs; for heads the config's key/value "
                              "heads, else its heads (with grouped key/value heads a unit is "
                              "one key/value head and its query heads).")
    fused: dict[str, FusedLayout] = Field(
        default_factory=dict,
        description="Rows modules that fuse several projections, and their layout: "
                    "qkv_stacked [q heads | k heads | v heads] (Phi3, GPT-2), qkv_interleaved "
                    "[q k v] per head (GPT-NeoX), qkv_grouped [its q heads, k, v] per key/value "
                    "head (Falcon's new architecture), qkv_multi_query [q heads | k | v] with "
                    "one shared key/value head, never pruned (Falcon-7B), halves [gate | up] "
                    "(Phi3's gate_up_proj).")
    query_heads: int | None = Field(None, ge=1, description="Query heads per block, for fused "
                                    "qkv layouts; default: the config's num_attention_heads.")

    @model_validator(mode="after")
    def _check_fused(self) -> UnitGroupSpec:
        for name, layout in self.fused.items():
            if name not in self.rows:
                raise ValueError(f"fused names {name!r}, which is not among rows {self.rows}. "
                                 "Fix: list fused projections in rows.")
            wanted = "neurons" if layout == "halves" else "heads"
            if self.kind != wanted:
                raise ValueError(f"fused layout {layout!r} of {name!r} splits {wanted}, and this "
                                 f"group's kind is {self.kind!r}. Fix: kind {wanted!r}, or a "
                                 f"{'qkv_* ' if self.kind == 'heads' else 'halves '}layout.")
        return self


# -- the fields, described once ---------------------------------------------------------------
# Each method's model below declares which of these it has and their defaults there.

Fraction = Annotated[float, Field(gt=0.0, le=1.0)]
InitialRemaining = Annotated[float, Field(gt=0.0, le=1.0, description=(
    "v_i: fraction of weights (structured: of units) kept during warm-up."))]
FinalRemaining = Annotated[float, Field(gt=0.0, le=1.0, description=(
    "v_f: fraction of weights (structured: of units) kept at the end."))]
ScopeField = Annotated[Scope, Field(description=(
    "Top-v per layer (local) or across all targeted layers (global; structured: across the "
    "blocks of one unit kind)."))]
ScoreLr = Annotated[float, Field(gt=0.0, description="Learning rate of the scores (their own "
                                 "param group, no weight decay; follows the weights' lr "
                                 "schedule).")]
ScoreInitField = Annotated[ScoreInit, Field(description=(
    "constant (score_init_value) | uniform (U(-value, value)) | kaiming | magnitude (|W| / "
    "mean |W| of the layer, times score_init_value: the first masks are magnitude masks; "
    "beyond the paper, RESULTS.md). constant is the paper's."))]
ScoreInitValue = Annotated[float, Field(allow_inf_nan=False, description=(
    "The constant, the uniform bound or the magnitude scale of score_init. Default: 1 for "
    "magnitude, else 0 (L0: 2.197, the paper's logit(0.9))."))]
ScoreInitOffset = Annotated[float, Field(allow_inf_nan=False, description=(
    "Added to every initial score (beyond the paper)."))]
FinalLambda = Annotated[float, Field(ge=0.0, allow_inf_nan=False, description=(
    "Regularizer weight reached at the end."))]
LambdaScheduleField = Annotated[LambdaSchedule, Field(description=(
    "cubic: lambda follows the cubic schedule to final_lambda; constant: final_lambda from "
    "step 0."))]
Threshold = Annotated[float, Field(ge=0.0, lt=1.0)]


def _requested(data: dict[str, Any]) -> bool:
    """Whether soft movement or L0 follow a requested final_remaining (data: the fields
    validated so far, for default factories)."""
    return data.get("final_remaining") is not None


#: Soft movement's and L0's v_i: only with a requested final_remaining (declared after it).
RequestedInitialRemaining = Annotated[Fraction | None, Field(
    default_factory=lambda data: 1.0 if _requested(data) else None,
    description="v_i with final_remaining (default 1).")]


def _magnitude_scale(fallback: float) -> Any:
    """score_init_value's default: 1 for magnitude scores (scale 1, for L0's log-alpha too: at
    the paper's 2.197 the weights at a 3% Top-v's edge sit at log-alpha ~6.5, where 99% of
    sampled gates clamp at 1 and their scores learn nothing; RESULTS.md), else ``fallback``."""
    return lambda data: 1.0 if data.get("score_init") == "magnitude" else fallback


class PruningPolicy(BaseModel):
    """A validated pruning policy: the base of the four methods' models.

    ``PruningPolicy(method=..., ...)``, :meth:`from_dict`, :meth:`from_file` and
    ``PruningPolicy.model_validate(...)`` give the model of the method named.

    Example:
        >>> PruningPolicy(method="movement", final_remaining=0.10, warmup_steps=500,
        ...               cooldown_steps=1000, total_steps=10_000).final_remaining
        0.1
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, validate_default=True)

    method: Method = Field(description="magnitude | movement (hard, Top-v + straight-through) | "
                           "soft_movement (threshold + sigmoid regularizer) | l0 (hard-concrete).")
    targets: list[str] = Field(
        default_factory=lambda: [".*"],
        description="Regexes searched in the qualified names of nn.Linear modules; a module is "
                    "pruned when one matches (use ^...$ to anchor).")
    exclude: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDE),
        description="Regexes of module names never pruned; default: the usual output heads.")
    exclude_heads: bool = Field(
        True, description="Leave output heads dense, found by structure: Linears outside a "
                          "Hugging Face model's base model (classifier, pre_classifier, "
                          "qa_outputs, lm_head), or a plain model's output Linears.")
    structure: Structure = Field(
        "unstructured", description="unstructured: one score per weight (the paper) | neurons: "
        "one per FFN unit | heads: one per attention head | hybrid: heads and neurons | blocks: "
        "one per block_shape block of each matrix. Units are tied across the modules that "
        "share them, so pruned ones can be removed (shrink).")
    block_shape: list[int] | None = Field(
        None, min_length=2, max_length=2,
        description="[rows, columns] of a block for structure 'blocks', e.g. [32, 32].")
    unit_groups: list[UnitGroupSpec] | None = Field(
        None, description="Which modules share units, for a model outside the known families "
                          "(prune_plugin.families: BERT-like, ViT, Llama-style, Phi, Phi3, "
                          "GPT-2, GPT-NeoX, Falcon, T5).")
    warmup_steps: int = Field(0, ge=0, description="t_i: optimizer steps before pruning starts.")
    cooldown_steps: int = Field(0, ge=0, description="t_f: final steps held at the end value.")
    total_steps: int = Field(ge=1, description="T: total optimizer steps of the run.")
    mask_update_every: int = Field(1, ge=1, description="Recompute masks every this many steps.")

    #: The version of the saved form (a dump); :func:`migrate` reads every earlier one.
    schema_version: ClassVar[int] = 2

    # -- construction: the method's model -------------------------------------------------------

    def __new__(cls, *args: Any, **data: Any) -> PruningPolicy:
        if cls is PruningPolicy:  # PruningPolicy(method=...): that method's model
            cls = _model_of(data)
        return super().__new__(cls)

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise _policy_error(err) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> PruningPolicy:
        try:
            if cls is PruningPolicy:
                return _ADAPTER.validate_python(obj, **kwargs)
            return super().model_validate(obj, **kwargs)
        except ValidationError as err:
            raise _policy_error(err) from None

    @classmethod
    def model_validate_json(cls, data: str | bytes, **kwargs: Any) -> PruningPolicy:  # type: ignore[override]
        try:
            if cls is PruningPolicy:
                return _ADAPTER.validate_json(data, **kwargs)
            return super().model_validate_json(data, **kwargs)
        except ValidationError as err:
            raise _policy_error(err) from None

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The union's schema (one definition per method) for PruningPolicy, a method's own
        for its model."""
        if cls is PruningPolicy:
            return {"title": "PruningPolicy", "description": "A pruning policy: the model of "
                    "the method named by 'method'.", **_ADAPTER.json_schema(*args, **kwargs)}
        return super().model_json_schema(*args, **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "policy") -> PruningPolicy:
        """Validate a mapping (a parsed JSON/YAML file or a DeepSpeed config entry)."""
        if not isinstance(data, dict):
            raise PolicyError(f"{source}: expected a mapping of policy fields, got "
                              f"{type(data).__name__} {data!r}. Fix: write it as "
                              '{"method": "movement", "total_steps": ...}.')
        odd = [k for k in data if not isinstance(k, str)]
        if odd:
            raise PolicyError(f"{source}: field names must be text, got {odd[0]!r}. Fix: write "
                              'it as {"method": "movement", "total_steps": ...}.')
        try:
            return _ADAPTER.validate_python(data)
        except ValidationError as err:
            raise _policy_error(err, source=source) from None

    @classmethod
    def from_file(cls, path: str | Path) -> PruningPolicy:
        """Load a policy from a ``.json``, ``.yaml`` or ``.yml`` file."""
        return cls.from_dict(read_policy_file(path), source=str(path))

    @classmethod
    def from_saved_json(cls, text: str | bytes) -> PruningPolicy:
        """A policy that a run saved (:meth:`to_json`), by this version or an earlier one
        (:func:`migrate`)."""
        try:
            data = json.loads(text)
        except ValueError:
            return cls.model_validate_json(text)  # (raises the PolicyError naming the problem)
        return cls.model_validate(migrate(data))

    def to_json(self) -> str:
        """The policy as JSON; :meth:`from_saved_json` reads it back."""
        return self.model_dump_json(indent=2)

    # -- validation shared by every method ----------------------------------------------------

    @field_validator("targets", "exclude")
    @classmethod
    def _regexes(cls, patterns: list[str], info: Any) -> list[str]:
        if info.field_name == "targets" and not patterns:
            raise ValueError("targets is empty, so nothing would be pruned. Fix: give at least "
                             "one regex, e.g. [\"encoder\"] or [\".*\"].")
        for i, pattern in enumerate(patterns):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{info.field_name}[{i}] = {pattern!r} is not a valid regular "
                                 f"expression ({err}). Fix: escape special characters, e.g. "
                                 f"{re.escape(pattern)!r}.") from None
        return patterns

    @model_validator(mode="after")
    def _schedule_and_structure(self) -> PruningPolicy:
        if self.warmup_steps + self.cooldown_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) + cooldown_steps ({self.cooldown_steps}) "
                f"= {self.warmup_steps + self.cooldown_steps} exceeds total_steps "
                f"({self.total_steps}). Fix: raise total_steps or shorten warm-up/cool-down.")
        every = self.mask_update_every
        if every > 1 and (self.total_steps % every or every >= self.total_steps):
            divisors = [d for d in range(1, min(self.total_steps, 64)) if self.total_steps % d == 0]
            raise ValueError(
                f"mask_update_every ({every}) must divide total_steps ({self.total_steps}) and be "
                f"smaller: masks are refreshed every {every} steps, so the run would end with "
                f"the masks of step {self.total_steps // every * every}, short of the final "
                f"target. Fix: set mask_update_every to a divisor of {self.total_steps} (e.g. "
                f"{', '.join(map(str, divisors[-3:]))}) or total_steps to a multiple of {every}.")
        initial = getattr(self, "initial_remaining", None)
        final = getattr(self, "final_remaining", None)
        if final is not None and initial is not None and final > initial:
            raise ValueError(
                f"final_remaining ({final}) is above initial_remaining ({initial}); pruning only "
                f"removes weights. Fix: set final_remaining <= initial_remaining.")
        if self.structure == "blocks" and self.block_shape is None:
            raise ValueError("structure 'blocks' needs block_shape, e.g. [32, 32]. Fix: set "
                             "block_shape.")
        if self.block_shape is not None and self.structure != "blocks":
            raise ValueError(f"block_shape applies to structure 'blocks', not "
                             f"{self.structure!r}. Fix: remove block_shape or set structure.")
        if self.block_shape is not None and min(self.block_shape) < 1:
            raise ValueError(f"block_shape {list(self.block_shape)} must be positive. Fix: e.g. "
                             "[32, 32].")
        if self.unit_groups is not None and self.structure in ("unstructured", "blocks"):
            raise ValueError(f"unit_groups apply to structures neurons, heads and hybrid, not "
                             f"{self.structure!r}. Fix: remove unit_groups or set structure.")
        score_init = getattr(self, "score_init", None)
        if self.structure != "unstructured" and score_init == "kaiming":
            raise ValueError("score_init 'kaiming' needs one score per weight; structured "
                             "pruning has one per unit. Fix: use constant, uniform or "
                             "magnitude.")
        value = getattr(self, "score_init_value", None)
        if score_init == "uniform" and value is not None and value <= 0:
            raise ValueError(f"score_init 'uniform' draws from U(-value, value) but "
                             f"score_init_value is {value}. Fix: set a positive "
                             "score_init_value.")
        return self

    @model_serializer(mode="wrap")
    def _without_unset_options(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Dumps leave out the options that are off (None): a mode's fields outside it."""
        return {k: v for k, v in handler(self).items() if v is not None}

    # -- derived --------------------------------------------------------------------------------

    @property
    def targets_remaining(self) -> bool:
        """Whether a regularized method follows a requested remaining fraction instead of the
        paper's lambda-set sparsity (always False for the Top-v methods, whose schedule is
        the remaining fraction)."""
        return False


class MagnitudePolicy(PruningPolicy):
    """Magnitude pruning: the Top-v of |W| on the cubic schedule (Eq. 5); no scores."""

    method: Literal["magnitude"]
    scope: ScopeField = "local"
    initial_remaining: InitialRemaining = 1.0
    final_remaining: FinalRemaining = 0.1


class MovementPolicy(PruningPolicy):
    """Hard movement pruning: the Top-v of learned scores, straight-through (Eqs. 2, 4)."""

    method: Literal["movement"]
    scope: ScopeField = "local"
    initial_remaining: InitialRemaining = 1.0
    final_remaining: FinalRemaining = 0.1
    score_lr: ScoreLr = 1e-2
    # |W|-started scores: from the paper's constant scores hard movement collapses to the
    # majority class at short budgets (benchmarks/collapse.py, RESULTS.md)
    score_init: ScoreInitField = "magnitude"
    score_init_value: ScoreInitValue = Field(default_factory=_magnitude_scale(0.0))
    score_init_offset: ScoreInitOffset = 0.0


class SoftMovementPolicy(PruningPolicy):
    """Soft movement pruning: mask sigmoid(S) > tau, tau on the cubic schedule, and the penalty
    lambda * mean sigmoid(S). With ``final_remaining`` (beyond the paper) the run ends at
    exactly that fraction, following it by ``remaining_control``."""

    method: Literal["soft_movement"]
    final_remaining: Fraction | None = Field(None, description=(
        "v_f, a requested sparsity (beyond the paper): the run ends at exactly v_f with no "
        "lambda calibration, following v(t) by remaining_control. Unset: lambda and tau set "
        "the sparsity, as in the paper."))
    initial_remaining: RequestedInitialRemaining
    remaining_control: RemainingControl | None = Field(None, description=(
        "With final_remaining, how the run follows v(t) (both beyond the paper). lambda: the "
        "paper's mask sigmoid(S) > tau on zero scores, lambda (final_lambda, default 3000, is "
        "its ceiling) scaled by a controller so that the remaining fraction follows v(t), "
        "never below it, and a global Top-v to exactly v_f from the cool-down on. topv: the "
        "masks are a global Top-v of the scores, which start from |W| / mean |W|. Default: "
        "lambda when the pruning window lets the scores reach the threshold (score_lr x "
        "(total - warm-up - cool-down steps) >= 2 |logit(0.1)|: 440 steps at the default "
        "score_lr) or a threshold is set, topv otherwise (RESULTS.md)."))
    initial_threshold: Threshold | None = Field(
        default_factory=lambda data: None if data.get("remaining_control") == "topv" else 0.0,
        description="tau_i, on sigmoid(S) (none under remaining_control topv).")
    final_threshold: Threshold | None = Field(
        default_factory=lambda data: None if data.get("remaining_control") == "topv" else 0.1,
        description="tau_f: mask = sigmoid(S) > tau, as in the original code "
                    "(sigmoied_threshold); none under remaining_control topv.")
    score_lr: ScoreLr = 1e-2
    # topv ranks the scores like hard movement, and collapses the same way from constant ones
    score_init: ScoreInitField = Field(
        default_factory=lambda data: "magnitude" if data.get("remaining_control") == "topv"
        else "constant")
    score_init_value: ScoreInitValue = Field(default_factory=_magnitude_scale(0.0))
    score_init_offset: ScoreInitOffset = 0.0
    # the controller's ceiling: enough to follow v(t) down to a few percent (3,000 tracked the
    # schedule where the paper's mode needed 634 for 10% and 1,081 for 3%; RESULTS.md)
    final_lambda: FinalLambda = Field(
        default_factory=lambda data: CONTROLLED_MAX_LAMBDA
        if data.get("remaining_control") == "lambda" else 400.0)
    lambda_schedule: LambdaScheduleField = "cubic"

    @model_validator(mode="before")
    @classmethod
    def _default_control(cls, data: Any) -> Any:
        # the default depends on which fields the user set, which a default factory cannot see
        if isinstance(data, dict) and data.get("final_remaining") is not None \
                and "remaining_control" not in data:
            data = {**data, "remaining_control": default_remaining_control(data)}
        return data

    @model_validator(mode="after")
    def _modes(self) -> SoftMovementPolicy:
        if self.final_remaining is None:
            for name in ("initial_remaining", "remaining_control"):
                if getattr(self, name) is not None:
                    raise ValueError(_needs_requested(name, getattr(self, name), self.method))
            if self.lambda_schedule == "cubic" and self.final_threshold == 0.0:
                raise ValueError("final_threshold is 0 with lambda_schedule 'cubic': lambda "
                                 "would stay 0 and nothing is pruned. Fix: set "
                                 "final_threshold in (0, 1).")
        if self.initial_threshold is not None and self.final_threshold is not None \
                and self.final_threshold < self.initial_threshold:
            raise ValueError(
                f"final_threshold ({self.final_threshold}) is below initial_threshold "
                f"({self.initial_threshold}); the threshold only rises. Fix: swap them.")
        if self.remaining_control == "topv":
            chosen = [n for n in ("initial_threshold", "final_threshold")
                      if getattr(self, n) is not None]
            if chosen:
                raise ValueError(f"{', '.join(chosen)} and final_remaining exclude each other "
                                 "with remaining_control 'topv': the threshold moves so that "
                                 "exactly that fraction remains. Fix: remove one of them, or "
                                 "set remaining_control: lambda (the paper's threshold).")
        elif self.initial_threshold is None or self.final_threshold is None:
            raise ValueError("initial_threshold and final_threshold are null: soft movement's "
                             "mask is sigmoid(S) > tau. Fix: give them values in [0, 1), or "
                             "leave them out.")
        return self

    @property
    def targets_remaining(self) -> bool:
        return self.final_remaining is not None


class L0Policy(PruningPolicy):
    """L0 regularization: a hard-concrete gate per weight, sampled in every training forward,
    and the penalty lambda * mean E[L0]. With ``final_remaining`` (beyond the paper) the gates
    outside a global Top-v of the scores close, v(t) on the cubic schedule."""

    method: Literal["l0"]
    final_remaining: Fraction | None = Field(None, description=(
        "v_f, a requested sparsity (beyond the paper): the masks are a global Top-v of the "
        "scores on the cubic schedule, lambda fades out as the open gates reach v(t), and "
        "the cool-down keeps the Top-v's gates open. Unset: lambda sets the sparsity, as in "
        "the paper."))
    initial_remaining: RequestedInitialRemaining
    score_lr: ScoreLr = 1e-1
    # at a requested fraction the Top-v ranks the scores: |W|-started, like hard movement
    score_init: ScoreInitField = Field(
        default_factory=lambda data: "magnitude" if _requested(data) else "constant")
    score_init_value: ScoreInitValue = Field(default_factory=_magnitude_scale(L0_OPEN_LOG_ALPHA))
    # ... on top of the paper's start, so every gate starts open: gates below 1 shrink the
    # pretrained weights, which stopped STS-B (RESULTS.md)
    score_init_offset: ScoreInitOffset = Field(
        default_factory=lambda data: L0_OPEN_LOG_ALPHA
        if _requested(data) and data.get("score_init") == "magnitude" else 0.0,
        description="Added to every initial score (beyond the paper). Default 0; 2.197 (the "
                    "paper's L0 start) with final_remaining and magnitude scores, whose "
                    "log-alpha is then ranked by |W| with every gate starting open.")
    final_lambda: FinalLambda = 125.0
    lambda_schedule: LambdaScheduleField = "constant"
    l0_beta: float = Field(2.0 / 3.0, gt=0.0, description="Hard-concrete temperature b.")
    l0_left: float = Field(-0.1, lt=0.0, description="Hard-concrete stretch l < 0.")
    l0_right: float = Field(1.1, gt=1.0, description="Hard-concrete stretch r > 1.")
    # gates that start open learn through the clamp at 1 (RESULTS.md)
    l0_gate_gradient: L0GateGradient = Field(
        default_factory=lambda data: "straight_through" if _requested(data) else "clamped",
        description="clamped (the paper's): a sampled gate clamped at 1 passes no gradient to "
        "its score. straight_through (beyond the paper): the score gradient passes the clamp "
        "at 1 as if unclamped, so open gates' scores still learn. Default: straight_through "
        "with final_remaining, clamped otherwise.")
    l0_warmup_gates: L0WarmupGates = Field(
        "sampled", description="The gates of the warm-up's training forwards (the first "
        "warmup_steps steps). sampled (the paper's): hard-concrete samples, as in the rest of "
        "the run. open (beyond the paper): gates of value 1, so the warm-up trains the dense "
        "model, while the scores learn from the sampled gates' gradient (straight-through).")

    @model_validator(mode="after")
    def _modes(self) -> L0Policy:
        if self.final_remaining is None and self.initial_remaining is not None:
            raise ValueError(_needs_requested("initial_remaining", self.initial_remaining,
                                              self.method))
        return self

    @property
    def targets_remaining(self) -> bool:
        return self.final_remaining is not None

    @property
    def l0_straight_through(self) -> bool:
        """Whether an L0 gate clamped at 1 still passes its score the gradient."""
        return self.l0_gate_gradient == "straight_through"


#: Each method's model, by name.
METHOD_POLICIES: dict[str, type[PruningPolicy]] = {
    "magnitude": MagnitudePolicy, "movement": MovementPolicy,
    "soft_movement": SoftMovementPolicy, "l0": L0Policy}
#: Any method's policy, told apart by ``method``: embed it in a pydantic model, or validate
#: with ``TypeAdapter(AnyPolicy)``.
AnyPolicy = Annotated[Union[MagnitudePolicy, MovementPolicy, SoftMovementPolicy, L0Policy],
                      Field(discriminator="method")]
_ADAPTER: TypeAdapter[PruningPolicy] = TypeAdapter(AnyPolicy)


def _model_of(data: dict[str, Any]) -> type[PruningPolicy]:
    """The model of ``data``'s method; a PolicyError naming the field when it has none."""
    model = METHOD_POLICIES.get(data.get("method"))  # type: ignore[arg-type]
    if model is None:
        try:
            _ADAPTER.validate_python(data)
        except ValidationError as err:
            raise _policy_error(err) from None
    return model  # type: ignore[return-value]


def _needs_requested(name: str, value: Any, method: str) -> str:
    return (f"{name} (= {value!r}) applies to {method} only with final_remaining (a requested "
            "sparsity), and none is set: lambda sets the sparsity. Fix: set final_remaining "
            f"too, or remove {name}.")


# Fields added after the first saved runs, with the behaviour of a saved policy that lacks them
# (remaining_control: with final_remaining).
_BEHAVIOUR_BEFORE: dict[str, Any] = {
    "remaining_control": "topv", "score_init_offset": 0.0, "l0_gate_gradient": "clamped",
    "l0_warmup_gates": "sampled"}


def migrate(data: Any) -> Any:
    """A saved policy's fields as this version reads them, from a dump of any earlier version
    (0.1 to 0.3 wrote one flat model with the same field names): a field added since takes the
    behaviour the run had, not today's default, so that a changed default cannot change a
    resumed run. Anything else is returned as it is, for validation to name."""
    method = data.get("method") if isinstance(data, dict) else None
    model = METHOD_POLICIES.get(method) if isinstance(method, str) else None  # (a list: unhashable)
    if model is None:
        return data
    data = dict(data)
    requested = data.get("final_remaining") is not None
    for field, before in _BEHAVIOUR_BEFORE.items():
        if field in model.model_fields and field not in data \
                and (requested or field != "remaining_control"):
            data[field] = before
    return data


def default_remaining_control(fields: dict[str, Any]) -> RemainingControl:
    """Soft movement's ``remaining_control`` when the user sets none, from the raw fields.

    ``lambda`` lets the paper's threshold decide, and the scores start at 0 and move about
    ``score_lr`` a step, so the threshold logit(tau_f) (-2.2 at tau_f = 0.1) is ~220 steps away:
    ``lambda`` when the pruning window could cover that twice, ``topv`` otherwise. In shorter
    windows the threshold prunes little and the cool-down's projection does most of it at
    once (250 steps on SST-2 at 10%: 70.0 +- 6.3 against topv's 78.2 +- 0.5; RESULTS.md). A
    threshold the user sets asks for the threshold: ``lambda``."""
    if "initial_threshold" in fields or "final_threshold" in fields:
        return "lambda"
    tau = 0.1  # final_threshold's default
    try:
        window = fields["total_steps"] - fields.get("warmup_steps", 0) \
            - fields.get("cooldown_steps", 0)
        travel = fields.get("score_lr", SoftMovementPolicy.model_fields["score_lr"].default) \
            * window
        reachable = travel >= 2.0 * abs(math.log(tau / (1.0 - tau)))
    except (KeyError, TypeError):
        return "lambda"  # fields that do not compute are invalid: validation names them
    return "lambda" if reachable else "topv"


def _policy_error(err: ValidationError, *, source: str = "policy") -> PolicyError:
    return policy_error(err, METHOD_POLICIES, PruningPolicy, source=source)
