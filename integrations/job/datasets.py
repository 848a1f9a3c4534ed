"""Task data for fine-pruning: load with ``datasets``, check columns and labels, tokenise.

Works the same with a Hub id (``nyu-mll/glue``), a local folder in the Hub's layout
(``../shared/data/glue``), SQuAD's own JSON files (``../shared/data/squad``: a folder or
one file; ``train-*.json`` is the train split, ``dev-*.json`` the validation split), or one
JSON lines, CSV or parquet file (its split is ``train``; a single SQuAD file's split follows
the same naming as in a folder). A split
may be sliced as in ``datasets``: ``validation[:8000]``, ``train[:10%]``. Every mistake
(missing folder, unknown column, labels that do not fit the task) is one line that says what
and how to fix it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prune_plugin.errors import PruningError

Task = Literal["classification", "regression", "question_answering"]
#: The ``datasets`` builder that reads a single data file, by suffix.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
#: A split name with an optional slice: "train", "validation[:8000]", "train[10%:]".
SPLIT_SPEC = re.compile(r"^([\w.-]+)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?$")


class DataError(PruningError, ValueError):
    """The dataset, its columns or its labels do not fit the job."""


@dataclass
class TaskData:
    train: Any  # datasets.Dataset, tokenised (question answering: one row per window)
    eval: Any
    task: Task
    num_labels: int
    label_names: list[str] | None
    train_examples: int
    eval_examples: int
    reference: Any = None  # question_answering.Reference, to score answers

    def compute_metrics(self, predictions: Any, label_ids: Any) -> dict[str, float]:
        """The task's metrics from the Trainer's predictions on ``eval``."""
        if self.reference is not None:
            return self.reference.score(predictions[0], predictions[1])
        from prune_plugin.integrations.transformers import classification_metrics

        return classification_metrics(predictions, label_ids, self.task)


def local_folder(name: str) -> Path | None:
    """The folder ``name`` means, or None for a Hub id ("name" or "org/name")."""
    folder = Path(name).expanduser()
    if folder.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return folder
    return None


def load_raw(path: str, name: str | None, splits: list[str]) -> dict[str, Any]:
    """``datasets.load_dataset(path, name)`` restricted to ``splits`` (which may be sliced:
    ``validation[:50%]``), with clear errors."""
    import datasets

    if not path.strip():
        raise DataError("data.path is empty. Fix: give a Hub id, a local folder or a data file.")
    folder = local_folder(path)
    if folder is not None and not folder.exists():
        raise DataError(f"dataset folder {path!r} does not exist. Fix: pass --dataset with the "
                        "folder holding the parquet files in the Hub layout, SQuAD JSON "
                        "files, or a Hub id.")
    raw = load_squad_json(folder) if folder is not None else None
    if raw is None:
        source, kwargs = str(folder) if folder is not None else path, {}
        if folder is not None and folder.is_file():  # one data file: its split is "train"
            source = FILE_BUILDERS.get(folder.suffix.lower(), "")
            if not source:
                raise DataError(f"cannot read {path!r}: a data file must be one of "
                                f"{sorted(FILE_BUILDERS)}. Fix: convert it, or pass a folder.")
            kwargs = {"data_files": str(folder)}
        try:
            raw = datasets.load_dataset(source, name, **kwargs)
        except Exception as err:  # noqa: BLE001 - unknown config, no data files, a Hub id
            # offline, an empty or ragged CSV, bytes that are not UTF-8: one line each
            cause = err
            while cause.__cause__ is not None or cause.__context__ is not None:
                cause = cause.__cause__ or cause.__context__  # the reader's own error
            text = str(cause).strip() or str(err).strip()
            if isinstance(cause, UnicodeDecodeError) or "utf8" in text.lower().replace("-", ""):
                raise DataError(f"cannot read dataset {path!r}: it is not UTF-8 text "
                                f"({text.splitlines()[0][:200]}). Fix: save it as UTF-8.") \
                    from None
            if "corresponds to no data" in text:
                raise DataError(f"dataset {path!r} is empty (a header and no rows?). Fix: check "
                                "the data file.") from None
            first = text.splitlines()[0] if text else type(cause).__name__
            offline = " (with no network, a Hub id loads only from the local cache)" \
                if folder is None else ""
            raise DataError(f"cannot load dataset {path!r} config {name!r}: {first[:300]}"
                            f"{offline}. Fix: check data.path and data.name.") from None
    out = {}
    for spec in splits:
        match = SPLIT_SPEC.match(spec.replace(" ", ""))
        if match is None:
            raise DataError(f"split {spec!r} is not a split name with an optional slice. Fix: "
                            "write e.g. 'train', 'validation[:8000]' or 'train[:10%]'.")
        split, lo, hi = match.groups()
        if split not in raw:
            raise DataError(f"dataset {path!r} ({name}) has no split {split!r}; it has "
                            f"{sorted(raw)}. Fix: set data.train_split / data.eval_split.")
        dataset = raw[split]
        if len(dataset) == 0:
            raise DataError(f"the {split!r} split of dataset {path!r} is empty (a header and no "
                            "rows?). Fix: check the data file.")
        if lo is not None or hi is not None:
            n = len(dataset)
            rows = range(n)[slice(_bound(lo, n), _bound(hi, n))]
            if not rows:
                raise DataError(f"split {spec!r} is empty ({split!r} has {n} rows).")
            dataset = dataset.select(rows)
        out[spec] = dataset
    return out


def _bound(text: str | None, n: int) -> int | None:
    if text is None:
        return None
    return round(float(text[:-1]) * n / 100) if text.endswith("%") else int(text)


def load_squad_json(path: Path) -> dict[str, Any] | None:
    """SQuAD's own JSON files (a folder of them, or one) as splits with the Hub's columns
    (id, title, context, question, answers{text, answer_start}); None if ``path`` holds
    none, so that ``datasets`` loads it instead."""
    import datasets

    files = [path] if path.is_file() and path.suffix == ".json" else \
        sorted(path.glob("*.json")) if path.is_dir() else []
    splits: dict[str, tuple[Path, Any]] = {}
    for file in files:
        try:
            articles = json.loads(file.read_text(encoding="utf-8")).get("data")
            articles[0]["paragraphs"][0]["qas"]  # noqa: B018 - the SQuAD layout, or not
        except (AttributeError, KeyError, IndexError, TypeError, ValueError):
            continue  # not a SQuAD file
        stem = file.stem.lower()
        split = "train" if stem.startswith("train") else \
            "validation" if stem.startswith("dev") else file.stem
        if split in splits:
            raise DataError(f"{path} holds two SQuAD files for the split {split!r} "
                            f"({file.name} and {splits[split][0].name}). Fix: pass the one "
                            "file you mean as data.path.")
        rows: dict[str, list] = {k: [] for k in ("id", "title", "context", "question",
                                                 "answers")}
        for article in articles:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    if "answers" not in qa:
                        raise DataError(f"{file}: question {qa.get('id')!r} has no answers "
                                        "(a test file?). Fix: use a file with answers.")
                    rows["id"].append(qa["id"])
                    rows["title"].append(article.get("title", ""))
                    rows["context"].append(paragraph["context"])
                    rows["question"].append(qa["question"])
                    rows["answers"].append({"text": [a["text"] for a in qa["answers"]],
                                            "answer_start": [a["answer_start"]
                                                             for a in qa["answers"]]})
        splits[split] = (file, datasets.Dataset.from_dict(rows, features=_squad_features()))
    return {split: dataset for split, (_, dataset) in splits.items()} or None


def _squad_features() -> Any:
    import datasets

    return datasets.Features({
        "id": datasets.Value("string"), "title": datasets.Value("string"),
        "context": datasets.Value("string"), "question": datasets.Value("string"),
        "answers": {"text": datasets.List(datasets.Value("string")),
                    "answer_start": datasets.List(datasets.Value("int32"))}})


#: A classification column with more distinct values than this and than half its rows is an
#: id (GLUE's ``idx``), not a label.
MAX_CLASSES = 64


def infer_task(dataset: Any, label_column: str, task: Task | None) -> tuple[Task, int,
                                                                            list[str] | None]:
    """The task, the number of labels and their names, checked against the label column.
    String labels are classes, named in sorted order."""
    import datasets

    feature = dataset.features[label_column]
    is_class = isinstance(feature, datasets.ClassLabel)
    dtype = getattr(feature, "dtype", "")
    is_float = dtype.startswith("float")
    is_text = dtype in ("string", "large_string")
    if not (is_class or is_float or is_text or dtype.startswith(("int", "uint", "bool"))):
        raise DataError(f"column {label_column!r} holds {feature}, not labels. Fix: set "
                        "data.label_column to the column with the labels.")
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
    values = dataset.unique(label_column)
    if None in values:
        raise DataError(f"column {label_column!r} has empty labels (row "
                        f"{dataset[label_column].index(None)}). Fix: drop the unlabelled rows.")
    if len(values) > max(MAX_CLASSES, len(dataset) // 2):
        raise DataError(f"column {label_column!r} has {len(values):,} distinct values over "
                        f"{len(dataset):,} rows: an id, not a label (a head with that many "
                        "classes). Fix: set data.label_column to the label column.")
    if is_text:
        return task, len(values), sorted(values)
    values = sorted(int(v) for v in values)
    if values and values[0] < 0:
        raise DataError(f"column {label_column!r} has label {values[0]}; classification "
                        "labels must be 0..N-1 (unlabelled test splits use -1). Fix: use a "
                        "labelled split.")
    _check_rare_labels(dataset, label_column)
    return task, values[-1] + 1 if values else 0, None


#: A class this rare (rows) beside classes this common looks like a typo, not a class.
RARE, COMMON = 2, 100


def _check_rare_labels(dataset: Any, label_column: str) -> None:
    """Refuse integer labels where a class has at most RARE rows and every other at least
    COMMON: a head would be created with a class for a typo (label 5 in a 2-class set)."""
    from collections import Counter

    counts = Counter(int(v) for v in dataset[label_column])
    rare = sorted(v for v, n in counts.items() if n <= RARE)
    common = [n for v, n in counts.items() if v not in rare]
    if rare and common and min(common) >= COMMON:
        rows = [i for i, v in enumerate(dataset[label_column]) if int(v) in rare][:3]
        raise DataError(
            f"column {label_column!r} has label(s) {rare} in only {sum(counts[v] for v in rare)}"
            f" row(s) (row {', '.join(map(str, rows))}), while the other classes have "
            f"{min(common):,} or more: a typo would add a class to the new head. Fix: correct "
            "or drop those rows.")


def check_labels(dataset: Any, label_column: str, task: Task, num_labels: int,
                 names: list[str] | None, split: str) -> None:
    """Every label of ``dataset`` fits the task inferred from the training split (before any
    training: a bad evaluation label must not cost the run)."""
    import math

    values = dataset.unique(label_column)
    if task == "regression":
        bad = [v for v in values if v is None or not math.isfinite(float(v))]
    elif names is not None and isinstance(values[0] if values else "", str):
        bad = [v for v in values if v not in names]
    else:
        bad = [v for v in values if v is None or not 0 <= int(v) < num_labels]
    if bad:
        shown = ", ".join(repr(v) for v in sorted(bad, key=repr)[:5])
        hint = (" (-1 marks unlabelled rows, as in GLUE's test splits: evaluate on a labelled "
                "split such as validation)") if -1 in bad else ""
        raise DataError(f"the {split} split's column {label_column!r} has labels {shown} that "
                        f"the training split's {num_labels} classes do not include{hint}. Fix: "
                        "give both splits the same labels.")


def check_texts(dataset: Any, columns: list[str], split: str) -> None:
    """Every text cell is a string (an empty cell would fail inside the tokenizer)."""
    for column in columns:
        for row, value in enumerate(dataset[column]):
            if not isinstance(value, str):
                raise DataError(f"the {split} split's column {column!r} has "
                                f"{'an empty cell' if value is None else repr(value)} at row "
                                f"{row}, not a text. Fix: drop or fill such rows, or set "
                                "data.text_columns.")


def prepare(tokenizer: Any, *, path: str, name: str | None, text_columns: list[str] | None,
            label_column: str | None, train_split: str, eval_split: str, max_length: int,
            task: Task | None = None, max_train_samples: int | None = None,
            max_eval_samples: int | None = None, seed: int = 0, doc_stride: int = 128
            ) -> TaskData:
    """Load, check and tokenise a sentence, sentence-pair or question-answering task.
    Padding is left to the collator (dynamic padding), so batches are only as long as their
    longest example."""
    raw = load_raw(path, name, [train_split, eval_split])
    train, evaluation = raw[train_split], raw[eval_split]
    qa = task == "question_answering"
    text_columns = text_columns or (["question", "context"] if qa else None)
    label_column = label_column or ("answers" if qa else "label")
    columns = set(train.column_names)
    if not text_columns:
        hint = " (this looks like question answering: set data.task: question_answering)" \
            if {"question", "context", "answers"} <= columns else ""
        raise DataError(f"data.text_columns is not set; {path!r} has columns "
                        f"{sorted(columns)}{hint}. Fix: name one text column, or two for "
                        "sentence pairs.")
    for col in [*text_columns, label_column]:
        if col not in columns:
            raise DataError(f"column {col!r} is not in {path!r} ({name}); its columns are "
                            f"{sorted(columns)}. Fix: set data.text_columns / "
                            "data.label_column.")
    if not 1 + qa <= len(text_columns) <= 2:
        raise DataError(f"data.text_columns has {len(text_columns)} columns; give "
                        + ("two: the question and the context." if qa else
                           "one (single sentence) or two (sentence pair)."))
    if not qa:  # from the whole split: a subsample may miss the highest class
        task, num_labels, label_names = infer_task(train, label_column, task)
    if max_train_samples is not None and max_train_samples < len(train):
        train = train.shuffle(seed=seed).select(range(max_train_samples))
    if max_eval_samples is not None and max_eval_samples < len(evaluation):
        evaluation = evaluation.select(range(max_eval_samples))
    for split, part in (("training", train), ("evaluation", evaluation)):
        check_texts(part, text_columns, split)
        if not qa:
            check_labels(part, label_column, task, num_labels, label_names, split)
    if qa:
        return _prepare_qa(tokenizer, train, evaluation, text_columns, label_column,
                           max_length, doc_stride)
    ids = {name: i for i, name in enumerate(label_names or [])}

    def encode(batch: dict[str, list]) -> dict[str, Any]:
        texts = [batch[c] for c in text_columns]
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        labels = batch[label_column]
        if task == "regression":
            labels = [float(x) for x in labels]
        elif labels and isinstance(labels[0], str):  # string classes: their sorted index
            labels = [ids[x] for x in labels]
        enc["labels"] = labels
        return enc

    tokenised = [d.map(encode, batched=True, remove_columns=d.column_names,
                       desc=f"tokenising {part}")
                 for d, part in ((train, "train"), (evaluation, "eval"))]
    return TaskData(*tokenised, task, num_labels, label_names, len(train), len(evaluation))


def _prepare_qa(tokenizer: Any, train: Any, evaluation: Any, text_columns: list[str],
                answers: str, max_length: int, doc_stride: int) -> TaskData:
    from prune_plugin.integrations.job import question_answering as qa

    feature = train.features[answers]
    if not (isinstance(feature, dict) and {"text", "answer_start"} <= set(feature)):
        raise DataError(f"column {answers!r} holds {feature}, not SQuAD answers "
                        "{text: [...], answer_start: [...]}. Fix: set data.label_column to "
                        "the answers column.")
    for split, part in (("training", train), ("evaluation", evaluation)):
        unanswered = sum(not a["text"] for a in part[answers])
        if unanswered:  # they would train towards [CLS], or score 0 whatever is predicted
            raise DataError(f"{unanswered} {split} questions have no answer (SQuAD 2.0 "
                            "style); this task is extractive question answering with an "
                            "answer in every context (SQuAD 1.1). Fix: filter them out.")
    if doc_stride >= max_length // 2:
        raise DataError(f"data.doc_stride ({doc_stride}) must be well below "
                        f"training.max_length ({max_length}). Fix: e.g. max_length 384 "
                        "with doc_stride 128, SQuAD's usual setting.")
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise DataError("question answering needs a tokenizer that pads on the right (the "
                        "answer positions count from the left). Fix: set padding_side "
                        "'right' in the model's tokenizer_config.json.")
    question, context = text_columns
    kwargs = dict(tokenizer=tokenizer, question_column=question, context_column=context,
                  answers_column=answers, max_length=max_length, doc_stride=doc_stride)
    try:
        train_features = qa.tokenize(train, keep_offsets=False, **kwargs)
        eval_features = qa.tokenize(evaluation, keep_offsets=True, **kwargs)
    except ValueError as err:
        raise DataError(str(err)) from None
    reference = qa.Reference.build(eval_features, evaluation, context, answers)
    return TaskData(train_features, eval_features, "question_answering", 2, None,
                    len(train), len(evaluation), reference)
