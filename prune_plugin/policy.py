"""`PruningPolicy`: what to prune, how, and on which schedule.

One strict pydantic v2 model, built from Python, JSON, YAML or a DeepSpeed config entry.
One unit everywhere: a *remaining* fraction is the fraction of weights KEPT (the paper's v).

Method-specific fields are refused for the other methods, so a typo'd or misplaced
hyperparameter never silently does nothing. Every error names the field, the value, the
allowed values and a fix (:class:`~prune_plugin.errors.PolicyError`).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler,
                      ValidationError, field_validator, model_serializer, model_validator)

from prune_plugin.errors import PolicyError

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

# Which methods each method-specific field belongs to (checked against fields the user set).
_FIELD_METHODS: dict[str, tuple[str, ...]] = {
    "scope": ("magnitude", "movement"),
    "initial_remaining": ("magnitude", "movement", "soft_movement", "l0"),
    "final_remaining": ("magnitude", "movement", "soft_movement", "l0"),
    "score_lr": ("movement", "soft_movement", "l0"),
    "score_init": ("movement", "soft_movement", "l0"),
    "score_init_value": ("movement", "soft_movement", "l0"),
    "score_init_offset": ("movement", "soft_movement", "l0"),
    "initial_threshold": ("soft_movement",),
    "final_threshold": ("soft_movement",),
    "final_lambda": ("soft_movement", "l0"),
    "lambda_schedule": ("soft_movement", "l0"),
    "remaining_control": ("soft_movement",),
    "l0_beta": ("l0",),
    "l0_left": ("l0",),
    "l0_right": ("l0",),
    "l0_gate_gradient": ("l0",),
    "l0_warmup_gates": ("l0",),
}

# Fields that soft movement and L0 use only with a requested final_remaining (without one, their
# lambda sets the sparsity), by method; read by validation, dumps and saved-policy loading.
_REQUESTED_ONLY: dict[str, tuple[str, ...]] = {
    "initial_remaining": ("soft_movement", "l0"),
    "remaining_control": ("soft_movement",),
}


def _applies(field: str, method: str, requested: bool) -> bool:
    """Whether ``field`` means something to ``method``, with (``requested``) or without a
    requested final_remaining."""
    if method not in _FIELD_METHODS.get(field, (method,)):
        return False
    return requested or method not in _REQUESTED_ONLY.get(field, ())


# Fields added after the first saved runs, with the behaviour of a saved policy that lacks them.
_BEHAVIOUR_BEFORE: dict[str, Any] = {
    "remaining_control": "topv", "score_init_offset": 0.0, "l0_gate_gradient": "clamped",
    "l0_warmup_gates": "sampled"}

# Defaults that depend on the method: the original code's settings (its README, Sec. "How to
# fine-prune?"). L0 starts its log-alpha scores at logit(0.9) = 2.197 so ~90% of gates are open.
# One exception, on evidence (benchmarks/collapse.py, RESULTS.md): hard movement (and L0 with
# a requested final_remaining, and soft movement's remaining_control topv: Top-vs of the
# scores too) starts its scores from the normalised |W| so that its first masks are magnitude
# masks; from the paper's constant scores it collapses to the majority class at short
# budgets. score_init: constant is the paper's.
_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "magnitude": {"final_remaining": 0.1},
    "movement": {"score_init": "magnitude", "score_init_value": 0.0, "final_remaining": 0.1},
    "soft_movement": {"score_init_value": 0.0, "final_lambda": 400.0, "lambda_schedule": "cubic"},
    "l0": {"score_init_value": L0_OPEN_LOG_ALPHA, "final_lambda": 125.0,
           "lambda_schedule": "constant", "score_lr": 1e-1},
}


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


class PruningPolicy(BaseModel):
    """A validated pruning policy.

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
    scope: Scope = Field("local", description="Top-v per layer (local) or across all targeted "
                         "layers (global; structured: across the blocks of one unit kind). "
                         "Top-v methods only.")
    initial_remaining: float = Field(1.0, gt=0.0, le=1.0,
                                     description="v_i: fraction of weights (structured: of "
                                                 "units) kept during warm-up.")
    final_remaining: float | None = Field(
        None, gt=0.0, le=1.0,
        description="v_f: fraction of weights kept at the end (magnitude, movement: default "
                    "0.1). Soft movement and L0: when set, the run ends at exactly v_f with no "
                    "lambda calibration (beyond the paper; soft movement: see "
                    "remaining_control; L0: the masks are a global Top-v of the scores on the "
                    "cubic schedule, lambda fades out as the open gates reach v(t), and the "
                    "cool-down keeps the Top-v's gates open); unset, lambda sets the sparsity, "
                    "as in the paper.")
    warmup_steps: int = Field(0, ge=0, description="t_i: optimizer steps before pruning starts.")
    cooldown_steps: int = Field(0, ge=0, description="t_f: final steps held at the end value.")
    total_steps: int = Field(ge=1, description="T: total optimizer steps of the run.")
    mask_update_every: int = Field(1, ge=1, description="Recompute masks every this many steps.")
    score_lr: float = Field(1e-2, gt=0.0, description="Learning rate of the scores.")
    score_init: ScoreInit = Field("constant", description="constant (score_init_value) | uniform "
                                  "(U(-value, value)) | kaiming | magnitude (|W| / mean |W| of "
                                  "the layer, times score_init_value, default 1: the "
                                  "first masks are magnitude masks; beyond the paper). Default: "
                                  "magnitude for movement, for L0 with final_remaining and "
                                  "for soft movement's remaining_control topv, constant "
                                  "otherwise; constant is the paper's.")
    score_init_value: float = Field(0.0, allow_inf_nan=False)
    score_init_offset: float = Field(0.0, allow_inf_nan=False,
                                     description="Added to every initial score (beyond the "
                                     "paper). Default 0; 2.197 (the paper's L0 start) for L0 "
                                     "with final_remaining, whose log-alpha is then ranked by "
                                     "|W| with every gate starting open.")
    initial_threshold: float = Field(0.0, ge=0.0, lt=1.0, description="tau_i, on sigmoid(S).")
    final_threshold: float = Field(0.1, ge=0.0, lt=1.0, description="tau_f: mask = sigmoid(S) > "
                                   "tau, as in the original code (sigmoied_threshold).")
    final_lambda: float = Field(0.0, ge=0.0, allow_inf_nan=False,
                                description="Regularizer weight reached at the end.")
    lambda_schedule: LambdaSchedule = Field(
        "cubic", description="cubic: lambda follows the threshold schedule to final_lambda "
                             "(soft movement); constant: final_lambda from step 0 (L0).")
    remaining_control: RemainingControl = Field(
        "lambda", description="Soft movement with final_remaining, how the run follows v(t) "
        "(both beyond the paper). lambda: the paper's mask sigmoid(S) > tau on zero scores, "
        "lambda (final_lambda, default 3000, is its ceiling) scaled by a controller so that "
        "the remaining fraction follows v(t), never below it, and a global Top-v to exactly "
        "v_f from the cool-down on. topv: the masks are a global Top-v of the scores, which "
        "start from |W| / mean |W|. Default: lambda when the pruning window lets the scores "
        "reach the threshold (score_lr x (total - warm-up - cool-down steps) >= "
        "2 |logit(0.1)|: 440 steps at the default score_lr) or a threshold is set, topv "
        "otherwise (RESULTS.md).")
    l0_beta: float = Field(2.0 / 3.0, gt=0.0, description="Hard-concrete temperature b.")
    l0_left: float = Field(-0.1, lt=0.0, description="Hard-concrete stretch l < 0.")
    l0_right: float = Field(1.1, gt=1.0, description="Hard-concrete stretch r > 1.")
    l0_gate_gradient: L0GateGradient = Field(
        "clamped", description="clamped (the paper's): a sampled gate clamped at 1 passes no "
        "gradient to its score. straight_through (beyond the paper): the score gradient passes "
        "the clamp at 1 as if unclamped, so open gates' scores still learn. Default: "
        "straight_through for L0 with final_remaining, clamped otherwise.")
    l0_warmup_gates: L0WarmupGates = Field(
        "sampled", description="The gates of the warm-up's training forwards (the first "
        "warmup_steps steps). sampled (the paper's): hard-concrete samples, as in the rest of "
        "the run. open (beyond the paper): gates of value 1, so the warm-up trains the dense "
        "model, while the scores learn from the sampled gates' gradient (straight-through).")

    schema_version: ClassVar[int] = 1

    # -- construction -------------------------------------------------------------------------

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise _policy_error(err) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> PruningPolicy:  # type: ignore[override]
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as err:
            raise _policy_error(err) from None

    @classmethod
    def model_validate_json(cls, data: str | bytes, **kwargs: Any) -> PruningPolicy:  # type: ignore[override]
        try:
            return super().model_validate_json(data, **kwargs)
        except ValidationError as err:
            raise _policy_error(err) from None

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
            return super().model_validate(data)
        except ValidationError as err:
            raise _policy_error(err, source=source) from None

    @classmethod
    def from_file(cls, path: str | Path) -> PruningPolicy:
        """Load a policy from a ``.json``, ``.yaml`` or ``.yml`` file."""
        return cls.from_dict(read_policy_file(path), source=str(path))

    # -- validation ---------------------------------------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("method"), str):
            defaults = dict(_METHOD_DEFAULTS.get(data["method"], {}))
            requested = data.get("final_remaining") is not None
            control = "topv"
            if data["method"] == "soft_movement" and requested:
                control = data["remaining_control"] if "remaining_control" in data \
                    else default_remaining_control(data)
                defaults["remaining_control"] = control  # (shown in dumps: chosen by the run)
            if data["method"] in ("soft_movement", "l0") and requested:
                if control == "topv":
                    # a global Top-v of the scores, like hard movement: from constant scores
                    # it collapses the same way (RESULTS.md)
                    defaults["score_init"] = "magnitude"
                    if data["method"] == "l0":
                        # gates that start open learn through the clamp at 1 (RESULTS.md)
                        defaults["l0_gate_gradient"] = "straight_through"
                else:
                    # the controller's ceiling: enough to follow v(t) down to a few percent
                    # (3,000 tracked the schedule where the paper's mode needed 634 for 10%
                    # and 1,081 for 3%; RESULTS.md)
                    defaults["final_lambda"] = CONTROLLED_MAX_LAMBDA
            if data.get("score_init", defaults.get("score_init")) == "magnitude":
                # scale 1, for L0's log-alpha too: at the paper's 2.197 the weights at a 3%
                # Top-v's edge sit at log-alpha ~6.5, where 99% of sampled gates clamp at 1 and
                # their scores learn nothing; the ranking stays |W|'s and collapses (RESULTS.md)
                defaults["score_init_value"] = 1.0
                if data["method"] == "l0" and requested:
                    # ... on top of the paper's start, so every gate starts open: gates below 1
                    # shrink the pretrained weights, which stopped STS-B (RESULTS.md); the
                    # straight-through clamp above keeps their scores learning
                    defaults["score_init_offset"] = L0_OPEN_LOG_ALPHA
            data = {**defaults, **data}
        return data

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
    def _cross_field(self) -> PruningPolicy:
        # Defaults injected for this method are applicable by construction; the check is
        # about fields the user set for another method.
        for name in sorted(self.model_fields_set):
            methods = _FIELD_METHODS.get(name)
            if methods is not None and self.method not in methods:
                raise ValueError(
                    f"field {name!r} (= {getattr(self, name)!r}) does not apply to method "
                    f"{self.method!r}; it is used by {', '.join(map(repr, methods))}. "
                    f"Fix: remove {name!r} or change 'method'.")
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
        if self.final_remaining is not None and self.final_remaining > self.initial_remaining:
            raise ValueError(
                f"final_remaining ({self.final_remaining}) is above initial_remaining "
                f"({self.initial_remaining}); pruning only removes weights. Fix: set "
                f"final_remaining <= initial_remaining.")
        if self.final_threshold < self.initial_threshold:
            raise ValueError(
                f"final_threshold ({self.final_threshold}) is below initial_threshold "
                f"({self.initial_threshold}); the threshold only rises. Fix: swap them.")
        for name in sorted(self.model_fields_set & _REQUESTED_ONLY.keys()):
            if not _applies(name, self.method, self.targets_remaining):
                raise ValueError(f"{name} (= {getattr(self, name)!r}) applies to {self.method} "
                                 "only with final_remaining (a requested sparsity), and none "
                                 "is set: lambda sets the sparsity. Fix: set final_remaining "
                                 f"too, or remove {name}.")
        if self.targets_remaining and self.method == "soft_movement" \
                and self.remaining_control == "topv":
            chosen = sorted({"initial_threshold", "final_threshold"} & self.model_fields_set)
            if chosen:
                raise ValueError(f"{', '.join(chosen)} and final_remaining exclude each other "
                                 "with remaining_control 'topv': the threshold moves so that "
                                 "exactly that fraction remains. Fix: remove one of them, or "
                                 "set remaining_control: lambda (the paper's threshold).")
        if self.method == "soft_movement" and not self.targets_remaining \
                and self.lambda_schedule == "cubic" and self.final_threshold == 0.0:
            raise ValueError("final_threshold is 0 with lambda_schedule 'cubic': lambda would "
                             "stay 0 and nothing is pruned. Fix: set final_threshold in (0, 1).")
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
        if self.structure != "unstructured" and self.score_init in ("kaiming",):
            raise ValueError("score_init 'kaiming' needs one score per weight; structured "
                             "pruning has one per unit. Fix: use constant, uniform or "
                             "magnitude.")
        if self.score_init == "uniform" and self.score_init_value <= 0:
            raise ValueError(f"score_init 'uniform' draws from U(-value, value) but "
                             f"score_init_value is {self.score_init_value}. Fix: set a "
                             "positive score_init_value.")
        return self

    @model_serializer(mode="wrap")
    def _canonical(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Dumps hold only the fields that apply to the method, so they validate back."""
        data = handler(self)
        requested = self.targets_remaining
        unused = {"initial_threshold", "final_threshold"} \
            if requested and self.remaining_control == "topv" else set()
        if self.method in ("soft_movement", "l0") and not requested:
            unused.add("final_remaining")  # (None: lambda sets the sparsity)
        return {k: v for k, v in data.items()
                if k not in unused and _applies(k, self.method, requested)}

    # -- derived --------------------------------------------------------------------------------

    @property
    def targets_remaining(self) -> bool:
        """Whether soft movement or L0 follow a requested remaining fraction (not the paper's
        lambda-set sparsity)."""
        return self.method in ("soft_movement", "l0") and self.final_remaining is not None

    @property
    def l0_straight_through(self) -> bool:
        """Whether an L0 gate clamped at 1 still passes its score the gradient."""
        return self.l0_gate_gradient == "straight_through"

    # -- serialisation ------------------------------------------------------------------------

    def to_json(self) -> str:
        """The full policy as JSON; ``PruningPolicy.model_validate_json`` reads it back."""
        return self.model_dump_json(indent=2)

    @classmethod
    def from_saved_json(cls, text: str | bytes) -> PruningPolicy:
        """A policy that a run saved (:meth:`to_json`), maybe with an earlier version: a field
        added since then takes the behaviour the run had, not today's default, so that a
        changed default cannot change a resumed run."""
        try:
            data = json.loads(text)
        except ValueError:
            return cls.model_validate_json(text)  # (raises the PolicyError naming the problem)
        if isinstance(data, dict) and isinstance(data.get("method"), str):
            requested = data.get("final_remaining") is not None
            for field, before in _BEHAVIOUR_BEFORE.items():
                if field not in data and _applies(field, data["method"], requested):
                    data[field] = before
        return cls.model_validate_json(json.dumps(data))


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
    defaults = PruningPolicy.model_fields
    tau = defaults["final_threshold"].default
    try:
        window = fields["total_steps"] - fields.get("warmup_steps", 0) \
            - fields.get("cooldown_steps", 0)
        travel = fields.get("score_lr", defaults["score_lr"].default) * window
        reachable = travel >= 2.0 * abs(math.log(tau / (1.0 - tau)))
    except (KeyError, TypeError):
        return "lambda"  # fields that do not compute are invalid: validation names them
    return "lambda" if reachable else "topv"


def read_policy_file(path: str | Path) -> dict[str, Any]:
    """The fields of a ``.json``, ``.yaml`` or ``.yml`` policy file, unvalidated (a job adds
    ``total_steps`` before validating); every problem is a PolicyError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"policy file {str(path)!r} does not exist. Fix: pass the path "
                          "of a .json or .yaml policy file.")
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise PolicyError(f"{path} is not a text file ({err.reason} at byte {err.start}). "
                          "Fix: write the policy as UTF-8 JSON or YAML.") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:  # pragma: no cover - depends on the environment
            raise PolicyError(f"reading {path} needs PyYAML. Fix: pip install pyyaml, or "
                              "write the policy as JSON.") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise PolicyError(f"{path}: not valid YAML: {err}") from None
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PolicyError(f"{path}: not valid JSON: {err}") from None
    else:
        raise PolicyError(f"policy file {str(path)!r} has suffix {path.suffix!r}; allowed: "
                          "'.json', '.yaml', '.yml'. Fix: rename it or convert it.")
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: expected a mapping of policy fields, got "
                          f"{type(data).__name__} {data!r:.80}. Fix: write it as "
                          '{"method": "movement", "total_steps": ...}.')
    return data


def _describe_allowed(err: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        return f" Allowed: {ctx['expected']}."
    return ""


def _suggest(value: Any, choices: list[str]) -> str:
    if isinstance(value, str):
        close = difflib.get_close_matches(value, choices, n=1)
        if close:
            return f" Did you mean {close[0]!r}?"
    return ""


def _policy_error(err: ValidationError, *, source: str = "policy") -> PolicyError:
    """Turn pydantic's errors into one message: field, value, what is allowed, how to fix."""
    for e in err.errors():
        # pydantic runs the overridden __init__ inside model_validate: unwrap its PolicyError.
        inner = (e.get("ctx") or {}).get("error")
        if isinstance(inner, PolicyError):
            return _format(inner.lines, inner.errors, source)  # type: ignore[attr-defined]
    lines = []
    fields = list(PruningPolicy.model_fields)
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(policy)"
        value = e.get("input")
        kind = e["type"]
        if kind == "extra_forbidden":
            lines.append(f"{loc}: unknown field (value {value!r}).{_suggest(loc, fields)} "
                         f"Allowed fields: {', '.join(fields)}.")
        elif kind == "missing":
            desc = PruningPolicy.model_fields[loc].description if loc in fields else None
            lines.append(f"{loc}: required field is missing. Fix: add {loc!r}"
                         + (f" ({desc})" if desc else "") + ".")
        elif kind == "literal_error":
            allowed = (e.get("ctx") or {}).get("expected", "")
            choices = [c.strip(" '") for c in allowed.replace(" or ", ",").split(",") if c.strip()]
            lines.append(f"{loc}: got {value!r}. Allowed: {allowed}.{_suggest(value, choices)}")
        elif kind == "value_error":
            lines.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            lines.append(f"{loc}: got {value!r} ({type(value).__name__}): {e['msg']}."
                         f"{_describe_allowed(e)} Fix: give {loc!r} a value that fits.")
    return _format(lines, err.errors(), source)


def _format(lines: list[str], errors: list[Any], source: str) -> PolicyError:
    n = len(lines)
    head = f"invalid pruning policy ({source}): {n} error{'s' if n > 1 else ''}"
    error = PolicyError(head + "\n  - " + "\n  - ".join(lines))
    error.lines = lines  # type: ignore[attr-defined]
    error.errors = errors  # type: ignore[attr-defined]
    return error
