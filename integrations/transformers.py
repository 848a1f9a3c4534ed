"""Hugging Face Trainer integration.

Two ways in, for scripts that already have a Trainer:

- ``Trainer(..., optimizers=(PruningOptimizer(...), None), callbacks=[PruningCallback()])``:
  your optimizer, wrapped; the callback logs the pruning state and saves it beside each
  checkpoint.
- ``PruningTrainer(..., pruning_policy=policy)``: builds the Trainer's usual AdamW (weight decay
  groups and all) and wraps it in ``create_optimizer()``, the hook that DeepSpeed and FSDP
  paths also go through. It adds the callback itself and, with ``teacher=``, distils
  (the paper's Sec. 6).

Resuming: ``trainer.train(resume_from_checkpoint=...)`` restores the scores, masks and step
with the model weights (an attached model's state dict carries them) and the score optimizer
state with ``optimizer.pt``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from prune_plugin.optimizer import PruningOptimizer, as_policy, find_pruning_optimizer
from prune_plugin.policy import PruningPolicy
from prune_plugin.report import sparsity_report

class PruningCallback(TrainerCallback):
    """Logs remaining weights and lambda, and refuses a schedule that cannot finish within the
    run. (Checkpoints need nothing more: the model's state dict carries scores, masks and
    step.)"""

    def __init__(self) -> None:
        self.optimizer: PruningOptimizer | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, optimizer: Any = None, **kwargs: Any) -> None:
        self.optimizer = find_pruning_optimizer(optimizer)
        if self.optimizer is None and args.deepspeed:
            raise TypeError("under DeepSpeed the Trainer ignores optimizers=(...), so no "
                            "PruningOptimizer reached the engine and nothing would be pruned. "
                            "Fix: use PruningTrainer(..., pruning_policy=...), which builds it "
                            "in create_optimizer().")
        if self.optimizer is None:
            raise TypeError("PruningCallback found no PruningOptimizer in the Trainer. Fix: pass "
                            "optimizers=(PruningOptimizer(...), None), or use PruningTrainer.")
        total = self.optimizer.policy.total_steps
        if state.max_steps and total > state.max_steps:
            raise ValueError(
                f"the pruning policy's total_steps ({total}) exceeds the Trainer's max_steps "
                f"({state.max_steps}): the final sparsity would never be reached. Fix: set "
                f"total_steps to {state.max_steps} (or train longer).")

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        # The Trainer stores a copy of the logs before callbacks run; PruningTrainer adds these
        # figures in log(), a plain Trainer gets them here.
        if logs is None or "remaining" in logs:
            return
        extra = pruning_logs(self.optimizer)
        logs.update(extra)
        if state.log_history:
            state.log_history[-1].update(extra)


def check_fsdp(trainer: Any) -> None:
    """The Trainer's ``fsdp`` arguments are refused before training, with the fix. FSDP1,
    accelerate's default, flattens the weights into one buffer; FSDP2 through accelerate
    re-creates the parameters and reloads the state dict by name while sharding, a path not yet
    tested with the pruning scores (it needs GPUs). A loop that calls ``fully_shard`` itself,
    and DeepSpeed through the Trainer, are tested."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    version = getattr(plugin, "fsdp_version", 1)
    why = ("flattens the weights into one buffer, so no Linear keeps a weight to prune"
           if version != 2 else "reloads the model's state dict while sharding, which is not "
           "yet tested with the pruning scores")
    raise ValueError(f"PruningTrainer with the Trainer's fsdp arguments (FSDP{version}): "
                     f"accelerate {why}. Fix: call torch.distributed.fsdp.fully_shard in your "
                     "own loop (examples/scale_out.py), or use DeepSpeed ZeRO-3 "
                     "(TrainingArguments(deepspeed=...)).")


def pruning_logs(optimizer: PruningOptimizer | None) -> dict[str, float]:
    """Remaining weights (and the schedule's target, and lambda) for the training logs."""
    if optimizer is None or optimizer.pruner.closed:
        return {}
    pruner = optimizer.pruner
    logs = {"remaining": round(sparsity_report(pruner.model).remaining, 5)}
    if pruner.method.schedule_name is not None:
        logs[pruner.method.schedule_name] = round(pruner.target, 5)
    lam = pruner.penalty_lambda  # (read once: for L0 at a requested fraction, a collective)
    if lam:
        logs["lambda"] = lam
    return logs


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """KL between the softened teacher and student distributions, times T^2 (Hinton et al.),
    as in the paper's code; mean squared error for regression (one output)."""
    if student_logits.shape[-1] == 1:
        return F.mse_loss(student_logits, teacher_logits)
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                    F.softmax(teacher_logits / temperature, dim=-1),
                    reduction="batchmean") * temperature ** 2


class PruningTrainer(Trainer):
    """A Trainer that prunes with ``pruning_policy`` and optionally distils from ``teacher``
    (``pruning_policy=None``: distillation alone).

    loss = alpha * KL(teacher/T || student/T) * T^2 + (1 - alpha) * task loss.
    """

    def __init__(self, *args: Any, pruning_policy: PruningPolicy | dict | str | Path | None,
                 teacher: torch.nn.Module | None = None, distill_alpha: float = 0.9,
                 distill_temperature: float = 2.0, **kwargs: Any) -> None:
        self.pruning_policy = None if pruning_policy is None else as_policy(pruning_policy)
        if not 0.0 <= distill_alpha <= 1.0:
            raise ValueError(f"distill_alpha must be in [0, 1], got {distill_alpha}")
        if not distill_temperature > 0:
            raise ValueError(f"distill_temperature must be > 0, got {distill_temperature}")
        self.teacher = teacher
        self.distill_alpha = distill_alpha
        self.distill_temperature = distill_temperature
        super().__init__(*args, **kwargs)
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self._check_deepspeed()  # may take the policy from the DeepSpeed config
        check_fsdp(self)
        if self.pruning_policy is not None and \
                not any(isinstance(c, PruningCallback) for c in self.callback_handler.callbacks):
            self.add_callback(PruningCallback())

    def _check_deepspeed(self) -> None:
        """Under DeepSpeed: take the policy from the config's entry if none was given, and
        refuse config blocks that would build DeepSpeed's own optimizer or scheduler (the
        first would drop the scores' param group, the second their learning rate)."""
        hf_config = getattr(self.args, "hf_deepspeed_config", None)
        if hf_config is None:
            return
        from prune_plugin.integrations.deepspeed import (CONFIG_KEY, DeepSpeedConfigError,
                                                         read_policy, refuse_blocks)
        config = hf_config.config
        entry = read_policy(config)
        if self.pruning_policy is None:
            self.pruning_policy = entry
        elif entry is not None and entry != self.pruning_policy:
            raise DeepSpeedConfigError(f"pruning_policy differs from the DeepSpeed config's "
                                       f"{CONFIG_KEY!r} entry. Fix: give the policy once.")
        if self.pruning_policy is None:
            return
        refuse_blocks(config, ("optimizer", "scheduler"), "the Trainer's AdamW and schedule "
                      "(TrainingArguments) are used and pruned.")

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        engine = getattr(getattr(self.accelerator, "deepspeed_engine_wrapped", None), "engine",
                         None)
        if engine is not None and self.pruning_policy is not None:
            from prune_plugin.integrations.deepspeed import bind
            bind(engine)  # before any resume: it refreshes masks after load_checkpoint
        return scheduler

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.pruning_policy is None:  # distillation alone
            return super().create_optimizer(model)
        if find_pruning_optimizer(self.optimizer) is None:
            target = self.model if model is None else model
            inner = super().create_optimizer(model)
            if self.is_deepspeed_enabled:
                # from_pretrained under ZeRO-3's zero.Init: the weights are already sharded
                from prune_plugin.integrations.deepspeed import attach_if_partitioned
                attach_if_partitioned(target, self.pruning_policy)
            self.optimizer = PruningOptimizer(inner, self.pruning_policy, model=target)
        return self.optimizer

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        logs.update(pruning_logs(find_pruning_optimizer(self.optimizer)))
        super().log(logs, *args, **kwargs)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any],
                     return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        if self.teacher is None or self.distill_alpha == 0.0:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        outputs = model(**inputs)
        task_loss = outputs.loss
        student = _task_logits(outputs)
        if self.teacher.device != student[0].device:
            self.teacher.to(student[0].device)
        with torch.no_grad():
            features = {k: v for k, v in inputs.items() if k not in self.label_names}
            teacher_logits = _task_logits(self.teacher(**features))
        # question answering: the mean over the start and end distributions, as in the
        # paper's code
        kd = sum(distillation_loss(s, t, self.distill_temperature)
                 for s, t in zip(student, teacher_logits)) / len(student)
        loss = self.distill_alpha * kd + (1.0 - self.distill_alpha) * task_loss
        return (loss, outputs) if return_outputs else loss


def _task_logits(outputs: Any) -> list[torch.Tensor]:
    """The logits to distil: ``logits``, or question answering's start and end logits."""
    if getattr(outputs, "start_logits", None) is not None:
        return [outputs.start_logits, outputs.end_logits]
    return [outputs.logits]


def classification_metrics(logits: Any, labels: Any, task: str) -> dict[str, float]:
    """accuracy (+ F1 of class 1 when binary) or Pearson/Spearman for regression."""
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    if task == "regression":
        pred, gold = logits.reshape(-1).double(), labels.reshape(-1).double()
        return {"pearson": _pearson(pred, gold),
                "spearman": _pearson(_ranks(pred), _ranks(gold))}
    pred = logits.argmax(-1)
    metrics = {"accuracy": float((pred == labels).double().mean())}
    if logits.shape[-1] == 2:
        tp = int(((pred == 1) & (labels == 1)).sum())
        fp, fn = int(((pred == 1) & (labels == 0)).sum()), int(((pred == 0) & (labels == 1)).sum())
        metrics["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return metrics


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / denom if denom else 0.0


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank), for Spearman."""
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(values), dtype=x.dtype).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(values), dtype=x.dtype).index_add_(0, inverse, torch.ones_like(x))
    return (sums / counts)[inverse]
