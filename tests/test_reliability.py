"""A user's work is never lost (issue 12): everything is checked before anything is written,
an old run is replaced only by a finished new one, every file the plugin writes is verified,
and a run resumes from its newest complete checkpoint. One test per case of the issue."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from prune_plugin import (NumericalError, PolicyError, PruningOptimizer, PruningPolicy,
                          StateError, load_pruning_state, save_pruning_state)
from prune_plugin.cli import main
from prune_plugin.integrations.job import JobError, load_job, prepare_job, run_job
from prune_plugin.integrations.job.run_folder import COMPLETE, RunFolder

from .models import MLP, job_dict, mlp_batch


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (what must stay unchanged)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def fake_finished_run(out: Path) -> dict[str, bytes]:
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    (out / "metrics.json").write_text('{"eval": {"accuracy": 0.9}}')
    RunFolder(out).set_state("finished")
    return tree(out)


def flip_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


# -- nothing is deleted or replaced before the new work is valid and done -------------------------

def test_overwrite_with_a_mistake_keeps_the_old_run(job_assets, tmp_path):
    out = tmp_path / "run"
    before = fake_finished_run(out)
    job = job_dict(job_assets, out)
    job["data"]["text_columns"] = ["text"]  # found while preparing the data
    with pytest.raises(JobError, match="column 'text'"):
        run_job(load_job(data=job), overwrite=True, progress=False)
    with pytest.raises(JobError, match="Did you mean 'movement'"):  # found by load_job
        job = job_dict(job_assets, out, method="movment")
        run_job(load_job(data=job), overwrite=True, progress=False)
    assert tree(out) == before and not RunFolder(out).replaced()


@pytest.mark.slow
def test_overwrite_failing_mid_run_keeps_the_old_run_aside(job_assets, tmp_path, monkeypatch):
    from transformers import Trainer

    out = tmp_path / "run"
    before = fake_finished_run(out)
    monkeypatch.setattr(Trainer, "train", lambda self, **kw: (_ for _ in ()).throw(
        RuntimeError("the machine went away")))
    with pytest.raises(RuntimeError, match="went away"):
        run_job(load_job(data=job_dict(job_assets, out)), overwrite=True, progress=False)
    (aside,) = RunFolder(out).replaced()
    assert tree(aside) == before  # the old run, whole, one rename away
    assert RunFolder(out).state() == "failed" and "went away" in RunFolder(out).error()
    with pytest.raises(JobError, match="failed run.*went away.*--overwrite"):
        prepare_job(load_job(data=job_dict(job_assets, out)))


@pytest.mark.slow
def test_overwrite_removes_the_old_run_once_the_new_one_finished(job_assets, tmp_path):
    out = tmp_path / "run"
    fake_finished_run(out)
    metrics = run_job(load_job(data=job_dict(job_assets, out)), overwrite=True, progress=False)
    assert not RunFolder(out).replaced() and RunFolder(out).state() == "finished"
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_bad_eval_labels_fail_before_training(job_assets, tmp_path):
    data = tmp_path / "reviews"
    data.mkdir()
    for split, n in (("train", 24), ("validation", 8)):
        rows = [{"sentence": f"good movie {i}", "label": i % 2} for i in range(n)]
        if split == "validation":
            rows[3]["label"] = -1  # an unlabelled row, as in GLUE's test splits
        (data / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    job = job_dict(job_assets, tmp_path / "run")
    job["data"].update(path=str(data), name=None)
    with pytest.raises(JobError, match=r"evaluation split.*labels -1.*unlabelled rows"):
        prepare_job(load_job(data=job))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change,message", [
    (lambda j, a, t: j["data"].update(label_column="idx"), r"distinct values.*an id"),
    (lambda j, a, t: j.update(output_dir=str(t / "file")), "is a file, not a folder"),
    (lambda j, a, t: j.update(model="some-org/no-such-model"), "no network.*local folder"),
    (lambda j, a, t: j.update(pruning=str(t / "list.yaml")), "expected a mapping of policy"),
    (lambda j, a, t: j.update(pruning=str(t / "bad.yaml")), "not valid YAML"),
    (lambda j, a, t: j["pruning"].update(mask_update_every=4), "must divide total_steps"),
    (lambda j, a, t: j["training"].update(max_steps=8) or j["pruning"].update(
        mask_update_every=8), "must divide total_steps .* and be smaller"),
])
def test_raw_tracebacks_become_one_line_errors(job_assets, tmp_path, change, message):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "list.yaml").write_text("- method: movement\n")
    (tmp_path / "bad.yaml").write_text("method: [movement\n")
    job = job_dict(job_assets, tmp_path / "run")
    change(job, job_assets, tmp_path)
    with pytest.raises(JobError, match=message):
        prepare_job(load_job(data=job))
    assert not (tmp_path / "run").exists()


def test_string_labels_are_classes_and_empty_texts_are_named(job_assets, tmp_path):
    import datasets
    from transformers import AutoTokenizer

    from prune_plugin.integrations.job.datasets import DataError, prepare

    tokenizer = AutoTokenizer.from_pretrained(job_assets["model"])
    rows = {"text": ["good movie", "bad plot", "fun", "dull"] * 3,
            "label": ["pos", "neg", "pos", "neg"] * 3}
    datasets.Dataset.from_dict(rows).to_json(str(tmp_path / "reviews.jsonl"))
    data = prepare(tokenizer, path=str(tmp_path / "reviews.jsonl"), name=None,
                   text_columns=["text"], label_column="label", train_split="train",
                   eval_split="train", max_length=16)
    assert data.label_names == ["neg", "pos"] and data.train["labels"][:2] == [1, 0]
    rows["text"][5] = None
    datasets.Dataset.from_dict(rows).to_json(str(tmp_path / "holes.jsonl"))
    with pytest.raises(DataError, match=r"column 'text' has an empty cell at row 5"):
        prepare(tokenizer, path=str(tmp_path / "holes.jsonl"), name=None, text_columns=["text"],
                label_column="label", train_split="train", eval_split="train", max_length=16)


def test_truncated_model_weights_are_named_before_anything_runs(job_assets, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(job_assets["model"], model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    job = job_dict(job_assets, tmp_path / "run")
    job["model"] = str(model)
    with pytest.raises(JobError, match="damaged or truncated"):
        prepare_job(load_job(data=job))


def test_a_policy_typo_is_reported_before_any_data_is_loaded(job_assets, tmp_path):
    job = job_dict(job_assets, tmp_path / "run", method="movment")
    job["data"]["path"] = str(tmp_path / "no-such-data")  # would fail if it were loaded
    with pytest.raises(JobError, match="Did you mean 'movement'"):
        load_job(data=job)


def test_mask_update_every_is_validated_against_the_run_in_the_policy():
    with pytest.raises(PolicyError, match=r"mask_update_every \(3\) must divide total_steps "
                                          r"\(10\).*Fix"):
        PruningPolicy(method="movement", total_steps=10, mask_update_every=3)
    with pytest.raises(PolicyError, match="and be smaller"):
        PruningPolicy(method="movement", total_steps=10, mask_update_every=10)
    assert PruningPolicy(method="movement", total_steps=10, mask_update_every=5)


# -- every file the plugin writes can be verified ------------------------------------------------

def test_a_flipped_byte_in_pruning_state_is_an_error_naming_the_tensor(tmp_path):
    model = MLP()
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters()),
                           PruningPolicy(method="movement", total_steps=4), model=model)
    path = save_pruning_state(opt, tmp_path / "state.safetensors")
    flip_byte(path)
    with pytest.raises(StateError, match=r"state.safetensors: tensor '.*' does not match its "
                                         r"checksum"):
        load_pruning_state(opt, path)


@pytest.mark.slow
def test_compressed_checkpoints_are_verified_and_decompress_never_replaces_silently(
        job_assets, tmp_path, capsys):
    out = tmp_path / "run"
    run_job(load_job(data=job_dict(job_assets, out)), progress=False)
    assert main(["compress", str(out), "--int8"]) == 0
    weights = out / "compressed-int8" / "model.compressed.safetensors"
    before = tree(out / "model")
    assert main(["decompress", str(out / "compressed-int8"), str(out / "model")]) == 2
    assert "a fine-pruning run's folder" in capsys.readouterr().err  # issue 29: never into a run
    assert tree(out / "model") == before
    flip_byte(weights, 300)
    assert main(["decompress", str(out / "compressed-int8"), str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err
    assert "does not match its checksum" in err and "model.compressed.safetensors" in err
    assert not (tmp_path / "plain").exists()


def test_a_truncated_sparsity_json_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "sparsity.json").write_text('{"layers": [{"name": "a", "ke')
    assert main(["report", str(tmp_path)]) == 2
    assert "sparsity.json is damaged" in capsys.readouterr().err


# -- resume from anywhere ------------------------------------------------------------------------

def _saving_job(job_assets, out, steps=8, save=2):
    job = job_dict(job_assets, out)
    job["training"].update(max_steps=steps, save_steps=save, logging_steps=1)
    job["pruning"].update(warmup_steps=1, cooldown_steps=2)
    return job


@pytest.mark.slow
def test_resume_takes_the_newest_complete_checkpoint_and_matches_the_uninterrupted_run(
        job_assets, tmp_path):
    full = run_job(load_job(data=_saving_job(job_assets, tmp_path / "full")), progress=False)
    out = tmp_path / "killed"
    run_job(load_job(data=_saving_job(job_assets, out)), progress=False)
    folder = RunFolder(out)
    # as a kill would leave it: the run unfinished, the newest checkpoint half written
    folder.set_state("running")
    for name in ("model", "metrics.json"):
        (shutil.rmtree if (out / name).is_dir() else os.remove)(out / name)
    newest = sorted(folder.checkpoints.iterdir())[-1]
    (newest / COMPLETE).unlink()
    (newest / "trainer_state.json").unlink()
    with pytest.raises(JobError, match="interrupted run.*--resume"):  # a plain rerun says how
        prepare_job(load_job(data=_saving_job(job_assets, out)))
    resumed = run_job(load_job(data=_saving_job(job_assets, out)), resume=True, progress=False)
    assert resumed["resumed_at_step"] == 6 and resumed["steps"] == 8
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-6)
    assert resumed["eval"]["accuracy"] == full["eval"]["accuracy"]
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(out / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list(folder.checkpoints.iterdir())) <= 2  # save_total_limit


@pytest.mark.slow
def test_resume_on_a_finished_run_does_nothing_and_a_changed_job_is_refused(job_assets,
                                                                           tmp_path, capsys):
    out = tmp_path / "run"
    metrics = run_job(load_job(data=_saving_job(job_assets, out)), progress=False)
    before = tree(out)
    assert run_job(load_job(data=_saving_job(job_assets, out)), resume=True,
                   progress=False) == metrics
    assert "nothing to resume" in capsys.readouterr().out and tree(out) == before
    RunFolder(out).set_state("failed", "killed")
    before = tree(out)
    changed = _saving_job(job_assets, out)
    changed["pruning"]["final_remaining"] = 0.5
    with pytest.raises(JobError, match=r"settings changed: pruning.final_remaining: 0.2 -> 0.5"):
        run_job(load_job(data=changed), resume=True, progress=False)
    assert tree(out) == before  # config.resolved.yaml untouched


# -- bad numbers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("scope", ["local", "global"])
def test_nan_scores_stop_the_run_naming_the_layer_and_step(scope):
    model = MLP()
    policy = PruningPolicy(method="movement", scope=scope, initial_remaining=0.5,
                           final_remaining=0.5, total_steps=10)
    opt = PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), policy, model=model)
    x, y = mlp_batch()
    for step in range(2):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if step == 1:
            model.fc2.pruning_scores.grad[0, 0] = float("nan")
        if step == 1:
            with pytest.raises(NumericalError, match=r"fc2.pruning_scores holds NaN or Inf "
                                                     r"after step 2.*learning rate"):
                opt.step()
        else:
            opt.step()
        opt.zero_grad()


def test_nan_weights_stop_magnitude_pruning():
    model = MLP()
    policy = PruningPolicy(method="magnitude", initial_remaining=0.5, final_remaining=0.5,
                           total_steps=10, scope="global")
    opt = PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), policy, model=model)
    with torch.no_grad():
        model.fc1.weight[3, 3] = float("inf")
    x, y = mlp_batch()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(NumericalError, match=r"fc1.weight holds NaN or Inf after step 1"):
        opt.step()


@pytest.mark.slow
def test_a_diverged_job_stops_with_the_fix_and_is_marked_failed(job_assets, tmp_path):
    job = job_dict(job_assets, tmp_path / "run")
    job["training"].update(learning_rate=1e30, logging_steps=1)
    with pytest.raises((JobError, NumericalError), match=r"diverged.*(learning rate|lr)"):
        run_job(load_job(data=job), progress=False)
    assert RunFolder(tmp_path / "run").state() == "failed"


@pytest.mark.slow
def test_checkpoints_are_bounded_by_save_total_limit(job_assets, tmp_path):
    job = job_dict(job_assets, tmp_path / "run")
    job["training"].update(max_steps=10, save_steps=2, logging_steps=2)
    job["pruning"].update(warmup_steps=1, cooldown_steps=2)
    run_job(load_job(data=job), progress=False)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["checkpoint-10", "checkpoint-8"]
    assert all((tmp_path / "run" / "checkpoints" / k / COMPLETE).is_file() for k in kept)


def test_the_job_file_itself_must_be_a_mapping(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(["not", "a", "job"]))
    with pytest.raises(JobError, match="holds a list, not a job"):
        load_job(path)
