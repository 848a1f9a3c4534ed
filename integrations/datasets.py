"""Task data for fine-pruning: load with ``datasets``, check columns and labels, tokenise.

Works the same with a Hub id (``nyu-mll/glue``) or a local folder in the Hub's layout
(``../shared/data/glue``). Every mistake (missing folder, unknown column, labels that do not
fit the task) is one line that says what and how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prune_plugin.errors import PruningError

Task = Literal["classification", "regression"]


class DataError(PruningError, ValueError):
    """The dataset, its columns or its labels do not fit the job."""


@dataclass
class TaskData:
    train: Any  # datasets.Dataset, tokenised
    eval: Any
    task: Task
    num_labels: int
    label_names: list[str] | None


def local_folder(name: str) -> Path | None:
    """The folder ``name`` means, or None for a Hub id ("name" or "org/name")."""
    folder = Path(name).expanduser()
    if folder.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return folder
    return None


def load_raw(path: str, name: str | None, splits: list[str]) -> dict[str, Any]:
    """``datasets.load_dataset(path, name)`` restricted to ``splits``, with clear errors."""
    import datasets

    folder = local_folder(path)
    if folder is not None and not folder.exists():
        raise DataError(f"dataset folder {path!r} does not exist. Fix: pass --dataset with the "
                        "folder holding the parquet files in the Hub layout, or a Hub id.")
    try:
        raw = datasets.load_dataset(str(folder) if folder is not None else path, name)
    except ValueError as err:  # unknown config name, among others
        raise DataError(f"cannot load dataset {path!r} config {name!r}: {err}") from None
    missing = [s for s in splits if s not in raw]
    if missing:
        raise DataError(f"dataset {path!r} ({name}) has no split {missing[0]!r}; it has "
                        f"{sorted(raw)}. Fix: set data.train_split / data.eval_split.")
    return {s: raw[s] for s in splits}


def infer_task(dataset: Any, label_column: str, task: Task | None) -> tuple[Task, int,
                                                                            list[str] | None]:
    """The task, the number of labels and their names, checked against the label column."""
    import datasets

    feature = dataset.features[label_column]
    is_class = isinstance(feature, datasets.ClassLabel)
    dtype = getattr(feature, "dtype", "")
    is_float = dtype.startswith("float")
    if task is None:
        task = "regression" if is_float else "classification"
    if task == "regression":
        if is_class or not (is_float or dtype.startswith("int")):
            raise DataError(f"task 'regression' needs numeric labels, but column "
                            f"{label_column!r} holds {feature}. Fix: set task: classification.")
        return task, 1, None
    if is_float:
        raise DataError(f"task 'classification' needs integer class labels, but column "
                        f"{label_column!r} holds floats ({dtype}). Fix: set task: regression "
                        "(e.g. STS-B).")
    if is_class:
        return task, feature.num_classes, list(feature.names)
    values = sorted(set(dataset[label_column]))
    if values and (values[0] < 0):
        raise DataError(f"column {label_column!r} has label {values[0]}; classification "
                        "labels must be 0..N-1 (unlabelled test splits use -1). Fix: use a "
                        "labelled split.")
    return task, int(values[-1]) + 1 if values else 0, None


def prepare(tokenizer: Any, *, path: str, name: str | None, text_columns: list[str],
            label_column: str, train_split: str, eval_split: str, max_length: int,
            task: Task | None = None, max_train_samples: int | None = None,
            max_eval_samples: int | None = None, seed: int = 0) -> TaskData:
    """Load, check and tokenise a sentence or sentence-pair task. Padding is left to the
    collator (dynamic padding), so batches are only as long as their longest example."""
    raw = load_raw(path, name, [train_split, eval_split])
    train, evaluation = raw[train_split], raw[eval_split]
    columns = set(train.column_names)
    for col in [*text_columns, label_column]:
        if col not in columns:
            raise DataError(f"column {col!r} is not in {path!r} ({name}); its columns are "
                            f"{sorted(columns)}. Fix: set data.text_columns / "
                            "data.label_column.")
    if not 1 <= len(text_columns) <= 2:
        raise DataError(f"data.text_columns has {len(text_columns)} columns; give one "
                        "(single sentence) or two (sentence pair).")
    task, num_labels, label_names = infer_task(train, label_column, task)
    if max_train_samples is not None and max_train_samples < len(train):
        train = train.shuffle(seed=seed).select(range(max_train_samples))
    if max_eval_samples is not None and max_eval_samples < len(evaluation):
        evaluation = evaluation.select(range(max_eval_samples))

    def encode(batch: dict[str, list]) -> dict[str, Any]:
        texts = [batch[c] for c in text_columns]
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        labels = batch[label_column]
        enc["labels"] = [float(x) for x in labels] if task == "regression" else labels
        return enc

    train = train.map(encode, batched=True, remove_columns=train.column_names,
                      desc="tokenising train")
    evaluation = evaluation.map(encode, batched=True, remove_columns=evaluation.column_names,
                                desc="tokenising eval")
    return TaskData(train, evaluation, task, num_labels, label_names)
