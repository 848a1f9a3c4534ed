"""Extractive question answering: SQuAD files, windows and answer positions, span decoding,
the official metrics, and the fine-pruning job on a tiny model."""

import itertools
import json
import shutil

import pytest
import torch

from prune_plugin.integrations.job import question_answering as qa
from prune_plugin.integrations.job.datasets import DataError, load_raw
from prune_plugin.integrations.job import JobError, load_job, run_job

from .models import tiny_hf_folder, tiny_qa_folder, tiny_squad_file

MAX_LENGTH, STRIDE = 24, 6


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    tiny_squad_file(root / "squad" / "train-v1.1.json", n_articles=6, seed=1)
    tiny_squad_file(root / "squad" / "dev-v1.1.json", n_articles=2, seed=2)
    (root / "squad" / "README.md").write_text("not a dataset card")
    from transformers import AutoTokenizer
    model = tiny_qa_folder(root / "model")
    return {"root": root, "squad": str(root / "squad"), "model": str(model),
            "classifier": str(tiny_hf_folder(root / "classifier")),
            "tokenizer": AutoTokenizer.from_pretrained(model)}


def features(assets, split="validation", keep_offsets=True):
    examples = load_raw(assets["squad"], None, [split])[split]
    return examples, qa.tokenize(examples, assets["tokenizer"], question_column="question",
                                 context_column="context", answers_column="answers",
                                 max_length=MAX_LENGTH, doc_stride=STRIDE,
                                 keep_offsets=keep_offsets)


def test_squad_json_folder_gives_hub_columns_and_sliced_splits(assets, tmp_path):
    raw = load_raw(assets["squad"], None, ["train", "validation", "train[:5]", "train[50%:]",
                                           "validation[-3:]"])
    source = json.loads((assets["root"] / "squad" / "train-v1.1.json").read_text())["data"]
    rows = [(p["context"], q) for a in source for p in a["paragraphs"] for q in p["qas"]]
    train = raw["train"]
    assert len(train) == len(rows) == 72 and len(raw["validation"]) == 24
    assert set(train.column_names) == {"id", "title", "context", "question", "answers"}
    assert train[7]["context"] == rows[7][0] and train[7]["id"] == rows[7][1]["id"]
    assert train[7]["answers"]["text"] == [a["text"] for a in rows[7][1]["answers"]]
    assert raw["train[:5]"]["id"] == train["id"][:5]
    assert raw["train[50%:]"]["id"] == train["id"][36:]
    assert raw["validation[-3:]"]["id"] == raw["validation"]["id"][-3:]
    for spec, message in (("train[:0]", "is empty"), ("train[1:2:3]", "optional slice"),
                          ("test", r"no split 'test'.*\['train', 'validation'\]")):
        with pytest.raises(DataError, match=message):
            load_raw(assets["squad"], None, [spec])
    # two files for one split, a file without answers: refused, naming the file
    twice = tmp_path / "twice"
    twice.mkdir()
    for name in ("dev-v1.1.json", "dev-v2.0.json"):
        (twice / name).write_text((assets["root"] / "squad" / "dev-v1.1.json").read_text())
    with pytest.raises(DataError, match="two SQuAD files for the split 'validation'"):
        load_raw(str(twice), None, ["validation"])
    test_file = json.loads((twice / "dev-v1.1.json").read_text())
    del test_file["data"][1]["paragraphs"][0]["qas"][2]["answers"]
    (tmp_path / "test-v1.1.json").write_text(json.dumps(test_file))
    with pytest.raises(DataError, match="test-v1.1.json: question '1-0-2' has no answers"):
        load_raw(str(tmp_path / "test-v1.1.json"), None, ["test-v1.1"])
    # a JSON file that is not SQuAD's is left to `datasets` (here: one row per object)
    (tmp_path / "rows.json").write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}')
    assert load_raw(str(tmp_path / "rows.json"), None, ["train"])["train"]["label"] == [1, 0]


def test_every_window_points_at_its_answer_or_at_cls(assets):
    examples, feats = features(assets, "train")
    assert len(feats) > len(examples)  # long contexts were cut into several windows
    holding = set()
    for f in feats:
        example = examples[f["example_index"]]
        answer = example["answers"]["text"][0]
        first = example["answers"]["answer_start"][0]
        spans = [tuple(o) for o in f["context_offsets"]]
        inside = [o for o in spans if o[0] >= 0]
        assert len(spans) == MAX_LENGTH
        assert example["context"][first:first + len(answer)] == answer
        if f["start_positions"] == 0:
            assert f["end_positions"] == 0
            assert not (inside[0][0] <= first and first + len(answer) <= inside[-1][1])
        else:
            s, e = f["start_positions"], f["end_positions"]
            assert 0 < s <= e and spans[s][0] >= 0 and spans[e][0] >= 0
            assert example["context"][spans[s][0]:spans[e][1]] == answer
            holding.add(f["example_index"])
    assert holding == set(range(len(examples)))  # every answer fits in some window


def test_answer_tokens_on_subwords_and_window_edges():
    # [CLS] question [SEP] "abc|defg| hijk|!" [SEP]: context tokens 3-6, sub-words included
    span = [None, None, None, (0, 3), (3, 7), (8, 12), (12, 13), None]
    assert qa._answer_tokens(span, 3, 12) == (4, 5)    # word pieces inside the answer
    assert qa._answer_tokens(span, 1, 5) == (3, 4)     # starts and ends mid-token
    assert qa._answer_tokens(span, 7, 13) == (5, 6)    # starts on the space before a word
    assert qa._answer_tokens(span, 12, 13) == (6, 6)   # one token
    window = [None, (3, 7), (8, 12), None]             # the context's first token is cut
    assert qa._answer_tokens(window, 0, 5) == (0, 0)   # begins before the window
    assert qa._answer_tokens(window, 8, 20) == (0, 0)  # ends after it
    assert qa._answer_tokens(window, -1, -1) == (0, 0)  # no answer


def test_best_spans_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    start, end = torch.randn(40, 17, generator=g), torch.randn(40, 17, generator=g)
    allowed = torch.rand(40, 17, generator=g) < 0.6
    allowed[3] = False
    score, first, last = qa.best_spans(start, end, allowed, max_answer_tokens=4, chunk=7)
    for r in range(40):
        pairs = [(float(start[r, i] + end[r, j]), i, j)
                 for i, j in itertools.product(range(17), repeat=2)
                 if allowed[r, i] and allowed[r, j] and 0 <= j - i < 4]
        if not pairs:
            assert score[r] == float("-inf")
            continue
        best = max(pairs)
        assert score[r] == pytest.approx(best[0]) and (first[r], last[r]) == best[1:]


def test_decoding_gold_logits_gives_the_gold_answers(assets):
    examples, feats = features(assets)
    starts, ends = torch.tensor(feats["start_positions"]), torch.tensor(feats["end_positions"])
    logits = torch.full((len(feats), MAX_LENGTH), -5.0)
    rows = torch.arange(len(feats))
    start_logits, end_logits = logits.clone(), logits.clone()
    start_logits[rows, starts] = 5.0  # windows without the answer only point at [CLS]
    end_logits[rows, ends] = 5.0
    reference = qa.Reference.build(feats, examples, "context", "answers")
    gold = [a["text"][0] for a in examples["answers"]]
    assert qa.decode(start_logits, end_logits, reference.offsets, reference.example_index,
                     reference.contexts) == gold
    assert reference.score(start_logits, end_logits) == {"exact_match": 100.0, "f1": 100.0}
    # tokens outside the context (question, [SEP], padding) never start or end an answer
    outside = reference.offsets[..., 0] < 0
    assert qa.decode(start_logits.masked_fill(outside, 50.0),
                     end_logits.masked_fill(outside, 50.0), reference.offsets,
                     reference.example_index, reference.contexts) == gold


def test_squad_scores_follow_the_official_script():
    assert qa.normalize_answer("The  Denver Broncos!") == "denver broncos"
    scores = qa.squad_scores(["Denver", "the Broncos.", "Carolina"],
                             [["Denver Broncos", "Broncos"], ["Broncos"], ["Denver"]])
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (2 / 3 + 1 + 0) / 3)
    with pytest.raises(ValueError, match="2 predictions for 1 questions"):
        qa.squad_scores(["a", "b"], [["a"]])


def qa_job(assets, out, **changes):
    job = {"model": assets["model"],
           "data": {"path": assets["squad"], "task": "question_answering",
                    "doc_stride": STRIDE},
           # small eval batches: the Trainer pads their logits to one width with -100
           "training": {"max_steps": 6, "batch_size": 16, "learning_rate": 1e-3,
                        "logging_steps": 2, "max_length": MAX_LENGTH, "eval_batch_size": 4},
           "pruning": {"method": "movement", "final_remaining": 0.3, "warmup_steps": 1,
                       "cooldown_steps": 2},
           "output_dir": str(out)}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            job[section][field] = value
        else:
            job[section] = value
    return job


@pytest.mark.slow
def test_qa_job_exports_a_model_that_reproduces_its_scores(assets, tmp_path):
    from transformers import AutoModelForQuestionAnswering

    metrics = run_job(load_job(data=qa_job(assets, tmp_path / "run")), progress=False)
    assert metrics["remaining"] == pytest.approx(0.3, abs=1e-3)
    assert metrics["train_examples"] == 72 and metrics["eval_examples"] == 24
    assert {"exact_match", "f1", "loss"} <= set(metrics["eval"])

    model = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "run" / "model").eval()
    assert not any("pruning" in k for k in model.state_dict())
    examples, feats = features(assets)
    reference = qa.Reference.build(feats, examples, "context", "answers")
    batch = assets["tokenizer"].pad({k: feats[k] for k in ("input_ids", "token_type_ids",
                                                           "attention_mask")},
                                    return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    scores = reference.score(out.start_logits, out.end_logits)
    assert scores["f1"] == pytest.approx(metrics["eval"]["f1"])
    assert scores["exact_match"] == pytest.approx(metrics["eval"]["exact_match"])


@pytest.mark.slow
def test_qa_distillation_and_errors(assets, tmp_path):
    dense = run_job(load_job(data=qa_job(assets, tmp_path / "dense", pruning=None)),
                    progress=False)
    assert dense["method"] == "dense"
    teacher = {"model": str(tmp_path / "dense" / "model"), "alpha": 0.5}
    alone = run_job(load_job(data=qa_job(assets, tmp_path / "alone")), progress=False)
    distil = run_job(load_job(data=qa_job(assets, tmp_path / "distil", teacher=teacher)),
                     progress=False)
    assert distil["train_loss"] != pytest.approx(alone["train_loss"], rel=1e-3)

    bad = [({"teacher": {"model": assets["classifier"]}},
            r"BertForSequenceClassification.*not a QuestionAnswering"),
           ({"data__task": None}, "text_columns is required"),
           ({"data__task": "classification", "data__text_columns": ["question"]},
            "column 'label' is not in"),
           ({"data__doc_stride": 12}, r"doc_stride \(12\) must be well below"),
           ({"data__label_column": "title"}, "not SQuAD answers"),
           ({"training__max_length": 8, "data__doc_stride": 3},
            r"3-token question leaves 2 of max_length \(8 tokens\).*Fix: raise")]
    unanswered = json.loads((assets["root"] / "squad" / "dev-v1.1.json").read_text())
    unanswered["data"][0]["paragraphs"][1]["qas"][0]["answers"] = []
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "dev-v2.0.json").write_text(json.dumps(unanswered))
    (tmp_path / "v2" / "train-v2.0.json").write_text(
        (assets["root"] / "squad" / "train-v1.1.json").read_text())
    bad.append(({"data__path": str(tmp_path / "v2")}, "1 evaluation questions have no answer"))
    left = tmp_path / "left-padding"
    shutil.copytree(assets["model"], left)
    config = json.loads((left / "tokenizer_config.json").read_text())
    (left / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    bad.append(({"model": str(left)}, "pads on the right"))
    for change, message in bad:
        with pytest.raises(JobError, match=message):
            run_job(load_job(data=qa_job(assets, tmp_path / "bad", **change)), progress=False)
        assert not (tmp_path / "bad" / "model").exists()
