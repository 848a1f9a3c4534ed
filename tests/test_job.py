"""The fine-pruning job end to end on a tiny model and dataset, and its errors."""

import json

import pytest
import torch

from prune_plugin.cli import main
from prune_plugin.integrations.job import JobError, load_job, prepare_job, run_job

from .models import EXAMPLES, job_dict


@pytest.fixture(scope="module")
def assets(job_assets):
    return job_assets


@pytest.mark.slow
def test_job_writes_a_plain_model_that_reproduces_the_metrics(assets, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "run"
    metrics = run_job(load_job(data=job_dict(assets, out)), progress=False)
    for name in ("metrics.json", "sparsity.json", "sparsity.png", "config.resolved.yaml",
                 "model/config.json", "model/model.safetensors", "model/tokenizer_config.json"):
        assert (out / name).exists(), name
    sparsity = json.loads((out / "sparsity.json").read_text())
    assert sparsity["remaining"] == pytest.approx(0.2, abs=1e-3) == metrics["remaining"]
    resolved = (out / "config.resolved.yaml").read_text()
    assert "total_steps: 6" in resolved
    # the run over its steps (logging_steps 2): what sparsity.png draws first
    history = sparsity["history"]
    assert [h["step"] for h in history] == [2, 4, 6]
    kept = [h["remaining"] for h in history]
    assert kept == sorted(kept, reverse=True) and kept[-1] == pytest.approx(0.2, abs=1e-3)
    assert all(h["loss"] > 0 for h in history)

    # The stock class loads it: no pruning keys, the kept weights, the same accuracy.
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    assert not any("pruning" in k for k in model.state_dict())
    q = model.bert.encoder.layer[0].attention.self.query.weight
    assert int(torch.count_nonzero(q)) <= round(0.2 * q.numel())
    import datasets
    tok = AutoTokenizer.from_pretrained(out / "model")
    val = datasets.load_dataset(assets["data"], "toy")["validation"]
    enc = tok(list(val["sentence"]), padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1)
    accuracy = float((pred == torch.tensor(val["label"])).double().mean())
    assert accuracy == pytest.approx(metrics["eval"]["accuracy"])


@pytest.mark.slow
def test_dense_job_and_distillation_job(assets, tmp_path):
    dense = job_dict(assets, tmp_path / "dense")
    dense["pruning"] = None
    dense_metrics = run_job(load_job(data=dense), progress=False)
    assert dense_metrics["method"] == "dense" and dense_metrics["remaining"] == 1.0
    alone = job_dict(assets, tmp_path / "alone", method="soft_movement", final_lambda=10.0)
    del alone["pruning"]["final_remaining"]
    distil = {**alone, "output_dir": str(tmp_path / "distil"),
              "teacher": {"model": str(tmp_path / "dense" / "model"), "alpha": 0.5}}
    without = run_job(load_job(data=alone), progress=False)
    metrics = run_job(load_job(data=distil), progress=False)
    assert metrics["method"] == "soft_movement" and metrics["teacher"].endswith("model")
    # the same run (seed, data, steps) trains on another loss once the teacher is used
    assert metrics["train_loss"] != pytest.approx(without["train_loss"], rel=1e-3)


def test_one_csv_file_with_sliced_splits_and_labels_counted_over_the_whole_split(assets,
                                                                                    tmp_path):
    from transformers import AutoTokenizer

    from prune_plugin.integrations.job.datasets import prepare

    rows = ["sentence,label"] + [f"good movie {i},{int(i % 2)}" for i in range(29)]
    (tmp_path / "reviews.csv").write_text("\n".join(rows + ["the plot was awful,2"]))
    data = prepare(AutoTokenizer.from_pretrained(assets["model"]),
                   path=str(tmp_path / "reviews.csv"), name=None, text_columns=["sentence"],
                   label_column=None, train_split="train", eval_split="train[24:]",
                   max_length=16, max_train_samples=3, seed=0)
    assert (data.train_examples, data.eval_examples) == (3, 6)
    assert 2 not in data.train["labels"]  # the subsample misses class 2...
    assert data.num_labels == 3  # ...which the head must still predict (it is in eval)
    assert data.eval["labels"][-1] == 2


def test_output_folder_with_a_run_is_not_overwritten(assets, tmp_path, capsys):
    from prune_plugin.integrations.job.run_folder import RunFolder

    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    RunFolder(out).set_state("finished")
    with pytest.raises(JobError, match="already holds a finished run.*--overwrite"):
        run_job(load_job(data=job_dict(assets, out)), progress=False)
    assert (out / "metrics.json").read_text() == "{}"


@pytest.mark.parametrize("change,message", [
    (lambda j, a: j["data"].update(path=str(a["root"] / "nope")), "dataset folder .* does not exist"),
    (lambda j, a: j.update(model=str(a["root"] / "nope")), "model folder .* does not exist"),
    (lambda j, a: j["data"].update(text_columns=["text"]), r"column 'text' is not in .*'sentence'"),
    (lambda j, a: j["data"].update(path=a["regression"], task="classification"), r"'classification' needs integer class labels.*Fix: set task: regression"),
    (lambda j, a: j["data"].update(task="regression"), "'regression' needs numeric labels"),
    (lambda j, a: j.update(teacher={"model": a["other_vocab"]}), "another vocabulary"),
    (lambda j, a: j["pruning"].update(method="movment"), "Did you mean 'movement'"),
    (lambda j, a: j["data"].update(path=a["regression"]), r"has a 2-label classification head.*task has 1"),
    (lambda j, a: j["training"].update(epochs=1), "exactly one of training.max_steps and training.epochs"),
    (lambda j, a: j["data"].update(train_split="dev"), r"no split 'dev'"),
])
def test_errors_name_what_and_how_to_fix(assets, tmp_path, change, message):
    job = job_dict(assets, tmp_path / "run")
    change(job, assets)
    with pytest.raises(JobError, match=message):
        prepare_job(load_job(data=job))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_overrides_and_one_line_errors(assets, tmp_path, capsys):
    import yaml
    job = job_dict(assets, tmp_path / "run")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    code = main(["fine-prune", str(path), "--max-steps", "4", "--no-progress",
                 "--set", "pruning.final_remaining=0.5", "--set", "training.learning_rate=1e-3", "--output-dir", str(tmp_path / "cli")])
    assert code == 0
    metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["remaining"] == pytest.approx(0.5, abs=1e-3)
    assert "outputs in" in capsys.readouterr().out
    assert main(["fine-prune", str(path), "--dataset", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset folder") and "Fix:" in err
    assert main(["report", str(tmp_path / "cli")]) == 0
    assert "pruned layers (12)" in capsys.readouterr().out
    assert main(["compress", str(tmp_path / "cli"), "--int8", "--codec", "none"]) == 0
    assert (tmp_path / "cli" / "compressed-int8" / "model.compressed.safetensors").is_file()


def test_group_by_length_batches_sentences_of_similar_length(tmp_path):
    """training.group_by_length reaches the Trainer's sampler, in the spelling of the installed
    transformers: batches of 8 drawn from lengths 1..64 span a few tokens instead of most."""
    import statistics

    import datasets
    from transformers import Trainer, TrainingArguments

    from prune_plugin.integrations.job import _length_grouping

    from .models import tiny_bert

    lengths = [n for n in range(1, 65) for _ in range(16)]
    data = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in lengths],
                                       "labels": [0] * len(lengths)})
    spans = {}
    for on in (False, True):
        args = TrainingArguments(output_dir=str(tmp_path / str(on)), per_device_train_batch_size=8,
                                 report_to=[], use_cpu=True, seed=0, **_length_grouping(on))
        trainer = Trainer(model=tiny_bert(), args=args, train_dataset=data,
                          data_collator=lambda rows: [len(r["input_ids"]) for r in rows])
        batches = list(trainer.get_train_dataloader())
        assert sorted(n for b in batches for n in b) == lengths  # every example once
        spans[on] = statistics.median(max(b) - min(b) for b in batches)
    assert spans[True] <= 4 and spans[False] >= 30
    job = {"model": "minilm", "data": {"path": "x", "text_columns": ["sentence"]},
           "training": {"max_steps": 1, "group_by_length": True}, "pruning": None,
           "output_dir": str(tmp_path / "run")}
    assert load_job(data=job).training.group_by_length


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_job_validates(example):
    job = load_job(example)  # raises on an unknown field or a policy that does not validate
    assert (job.pruning is None) == ("dense" in example.name)
