"""The job never loses work, round 2 (issue 29): it deletes only what it wrote, one job per
folder, signals stop it at a safe point, compressed files are data, and each refusal is one
line with the fix. One test per case found by the adversarial review."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from prune_plugin import StateError
from prune_plugin.cli import main
from prune_plugin.compress import compress_folder, load_compressed
from prune_plugin.integrations.job import JobError, load_job, run_job
from prune_plugin.integrations.job.run_folder import RunFolder
from prune_plugin.storage import read_safetensors, write_safetensors

from .models import job_dict
from .test_reliability import fake_finished_run, tree

ROOT = Path(__file__).resolve().parents[1]


def user_folder(path: Path) -> dict[str, bytes]:
    """A folder of the user's own files (no run record)."""
    (path / "mydata").mkdir(parents=True)
    (path / "notes.txt").write_text("a week of notes")
    (path / "mydata" / "table.csv").write_text("a,b\n1,2\n")
    return tree(path)


# -- it deletes only what it wrote ------------------------------------------------------------

@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_of_the_users_files_is_never_an_output(job_assets, tmp_path, overwrite):
    out = tmp_path / "work"
    before = user_folder(out)
    with pytest.raises(JobError, match=r"not empty.*holds no run of this job.*Fix: choose a new"):
        run_job(load_job(data=job_dict(job_assets, out)), overwrite=overwrite, progress=False)
    assert tree(out) == before
    assert not list(tmp_path.glob(".work.replaced-*"))


@pytest.mark.parametrize("inside", ["checkpoints", "model", "model/deeper"])
def test_a_folder_inside_another_run_is_never_an_output(job_assets, tmp_path, inside):
    run = tmp_path / "run"
    before = fake_finished_run(run)
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-2" / "x").write_text("state")
    before = tree(run)
    for overwrite in (False, True):
        with pytest.raises(JobError, match=r"inside the run folder .*Fix: choose a folder"):
            run_job(load_job(data=job_dict(job_assets, run / inside)), overwrite=overwrite,
                    progress=False)
    assert tree(run) == before


def test_a_users_own_status_json_above_the_output_is_not_a_run(job_assets, tmp_path):
    """Only the job's record (a mapping with a state) makes a run folder: a project folder
    with its own status.json of another shape still takes runs below it."""
    (tmp_path / "status.json").write_text('["my tool\'s status"]')
    out = tmp_path / "runs" / "a"
    run_job(load_job(data=job_dict(job_assets, out)), progress=False)
    assert RunFolder(out).state() == "finished"
    assert (tmp_path / "status.json").read_text() == '["my tool\'s status"]'


def test_a_symlink_into_another_run_is_never_followed(job_assets, tmp_path):
    run = tmp_path / "run"
    before = fake_finished_run(run)
    link = tmp_path / "link"
    link.symlink_to(run / "model")
    with pytest.raises(JobError, match=r"through a symlink"):
        run_job(load_job(data=job_dict(job_assets, link / "out")), progress=False)
    (tmp_path / "whole").symlink_to(run)
    with pytest.raises(JobError, match=r"symlink to the run folder"):
        run_job(load_job(data=job_dict(job_assets, tmp_path / "whole")), overwrite=True,
                progress=False)
    assert tree(run) == before


@pytest.mark.parametrize("output,match", [("", "output_dir is empty"),
                                          ("file/run", "which is a file")])
def test_an_output_dir_that_cannot_be_a_run_is_refused(job_assets, tmp_path, output, match,
                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(JobError, match=match):
        run_job(load_job(data=job_dict(job_assets, output)), progress=False)
    assert (tmp_path / "file").read_text() == "mine"
    assert not (tmp_path / "status.json").exists()


# -- one job per folder -----------------------------------------------------------------------

def test_a_second_job_into_a_locked_folder_is_refused_naming_the_first(job_assets, tmp_path):
    out = tmp_path / "run"
    with RunFolder(out).lock():  # another job holds it (flock: per open file, so this counts)
        with pytest.raises(JobError, match=rf"another job is running into .*pid {os.getpid()}"):
            run_job(load_job(data=job_dict(job_assets, out)), progress=False)
    assert not out.exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(job_assets, tmp_path):
    out = tmp_path / "run"
    (tmp_path / ".run.lock").write_text("pid 999999, started long ago")  # nobody holds it
    run_job(load_job(data=job_dict(job_assets, out)), progress=False)
    assert RunFolder(out).state() == "finished"


# -- decompress replaces no run and never its own source --------------------------------------

def _compressed_run(tmp_path: Path) -> Path:
    from .models import tiny_hf_folder

    run = tmp_path / "run"
    tiny_hf_folder(run / "model")
    RunFolder(run).set_state("finished")
    compress_folder(run / "model", run / "compressed-int8", quantize="int8")
    return run


@pytest.mark.parametrize("dest", ["run", "source", "inside-source", "inside-run"])
def test_decompress_refuses_a_run_folder_or_its_own_source_even_with_overwrite(tmp_path, dest):
    run = _compressed_run(tmp_path)
    source = run / "compressed-int8"
    target = {"run": run, "source": source, "inside-source": source / "x",
              "inside-run": run / "plain"}[dest]
    before = tree(run)
    code = main(["decompress", str(source), str(target), "--overwrite"])
    assert code == 2
    assert tree(run) == before


# -- compressed files are data, not trust -----------------------------------------------------

def _forge(path: Path, change) -> None:
    blobs, meta = read_safetensors(path / "model.compressed.safetensors", what="test")
    manifest = json.loads(meta["manifest"])
    change(manifest, blobs)
    meta["manifest"] = json.dumps(manifest)
    write_safetensors(path / "model.compressed.safetensors", blobs, meta)


def _first(manifest: dict, encoding: str) -> str:
    return next(n for n, e in manifest["params"].items() if e["encoding"] == encoding)


@pytest.mark.parametrize("case,match", [
    ("codec", "codec 'brotli' is not one of"),
    ("dtype", "dtype 'F128' is not one of"),
    ("shape", "shape .* is not a list of sizes"),
    ("missing-blob", "blob .* is missing"),
    ("bigger-shape", "holds .* bytes, its manifest entry declares"),
    ("bomb", "decompresses to more than"),
])
def test_a_crafted_compressed_file_is_refused_with_the_field(tmp_path, case, match):
    import lzma

    run = _compressed_run(tmp_path)
    path = run / "compressed-int8"

    def change(manifest, blobs):
        dense = _first(manifest, "dense")
        if case == "codec":
            manifest["codec"] = "brotli"
        elif case == "dtype":
            manifest["params"][dense]["dtype"] = "F128"
        elif case == "shape":
            manifest["params"][dense]["shape"] = [-1, 4]
        elif case == "missing-blob":
            del blobs[f"{dense}:dense"]
        elif case == "bigger-shape":  # declares more elements than the blob holds
            entry = manifest["params"][dense]
            entry["shape"] = [int(torch.tensor(entry["shape"]).prod()) + 5]
        elif case == "bomb":  # 256 MiB of zeros in ~40 KB, under a small entry
            blobs[f"{dense}:dense"] = torch.frombuffer(
                bytearray(lzma.compress(bytes(1 << 28), preset=1)), dtype=torch.uint8)
    _forge(path, change)
    with pytest.raises(StateError, match=match):
        load_compressed(path)
    assert main(["decompress", str(path), str(tmp_path / "plain")]) == 2
    assert not (tmp_path / "plain").exists()


# -- the command line: one line, the conventional codes ---------------------------------------

def test_report_on_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Fix:" in err and len(err.strip().splitlines()) == 1


def test_resume_with_changed_settings_on_a_finished_run_is_refused(job_assets, tmp_path):
    out = tmp_path / "run"
    run_job(load_job(data=job_dict(job_assets, out)), progress=False)
    before = tree(out)
    changed = load_job(data=job_dict(job_assets, out), overrides={"pruning.final_remaining": 0.5})
    with pytest.raises(JobError, match=r"settings\s+changed: pruning.final_remaining"):
        run_job(changed, resume=True, progress=False)
    assert tree(out) == before


def _job_file(job_assets, tmp_path: Path, steps: int) -> Path:
    job = job_dict(job_assets, tmp_path / "run")
    job["training"].update(max_steps=steps, logging_steps=1)
    job["pruning"].update(warmup_steps=1, cooldown_steps=2)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_at_a_safe_point_and_the_run_resumes(job_assets, tmp_path, sig, code):
    """Ctrl-C or SIGTERM mid-training: the current step ends, a checkpoint is written, the run
    is marked interrupted, one line says how to resume, the exit code is 128 + the signal;
    --resume then finishes the run."""
    steps = 300
    job = _job_file(job_assets, tmp_path, steps=steps)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "prune_plugin", "fine-prune", str(job),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    seen = []
    for line in proc.stdout:  # the Trainer prints each log: training has started
        seen.append(line)
        if "'loss'" in line:
            break
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    assert "Setting accelerator to CPU" not in "".join(seen) + out + err  # DeepSpeed quiet
    message = [line for line in err.splitlines() if "--resume" in line]
    assert len(message) == 1 and signal.Signals(sig).name in message[0]
    folder = RunFolder(tmp_path / "run")
    assert json.loads((folder.path / "status.json").read_text())["state"] == "interrupted"
    saved = folder.newest_complete_checkpoint()
    assert saved is not None and 0 < int(saved.name.split("-")[1]) < steps
    metrics = run_job(load_job(job), resume=True, progress=False)
    assert folder.state() == "finished" and metrics["steps"] == steps
    assert metrics["resumed_at_step"] == int(saved.name.split("-")[1])
    history = json.loads((folder.path / "sparsity.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, steps + 1))  # the whole run's logs


def test_a_loss_that_grows_by_orders_of_magnitude_stops_the_run(job_assets, tmp_path):
    job = job_dict(job_assets, tmp_path / "run")
    job["training"].update(learning_rate=1e3, logging_steps=1, max_steps=12)
    with pytest.raises(JobError, match=r"diverged at step \d+: the training loss grew from"):
        run_job(load_job(data=job), progress=False)
    assert RunFolder(tmp_path / "run").state() == "failed"


# -- checked before training: nothing written before they pass --------------------------------

def _csv_job(job_assets, tmp_path: Path, text: bytes | str) -> dict:
    path = tmp_path / "data.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    job = job_dict(job_assets, tmp_path / "run")
    job["data"] = {"path": str(path), "text_columns": ["sentence"], "eval_split": "train"}
    return job


@pytest.mark.parametrize("case,match", [
    ("header-only", "is empty"),
    ("ragged", "cannot load dataset"),
    ("latin-1", "not UTF-8"),
    ("label-typo", r"label\(s\) \[5\] in only 1 row"),
])
def test_bad_data_files_are_one_line_errors_before_anything_is_written(job_assets, tmp_path,
                                                                       case, match):
    rows = "".join(f"movie {i} was {'good' if i % 2 else 'bad'},{i % 2}\n" for i in range(240))
    text = {"header-only": "sentence,label\n",
            "ragged": "sentence,label\na,1\nb,0,extra,cells\n" + rows,
            "latin-1": ("sentence,label\n" + rows + "caf\xe9 cr\xe8me,1\n").encode("latin-1"),
            "label-typo": "sentence,label\n" + rows + "a typo,5\n"}[case]
    job = _csv_job(job_assets, tmp_path, text)
    with pytest.raises(JobError, match=match) as info:
        run_job(load_job(data=job), progress=False)
    assert "\n" not in str(info.value) and "Fix:" in str(info.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field,value,match", [
    ("batch_size", 10**12, "less than or equal to 65536"),
    ("seed", -1, "greater than or equal to 0"),
    ("seed", 2**40, "less than or equal to 4294967295"),
    ("max_length", 1024, "above the 64 positions"),
])
def test_out_of_range_training_settings_are_refused_before_training(job_assets, tmp_path,
                                                                    field, value, match):
    job = job_dict(job_assets, tmp_path / "run")
    job["training"][field] = value
    with pytest.raises(JobError, match=match):
        run_job(load_job(data=job), progress=False)
    assert not (tmp_path / "run").exists()


def test_too_little_free_space_is_refused_before_training(job_assets, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    job = job_dict(job_assets, tmp_path / "run")
    job["training"]["save_steps"] = 2
    with pytest.raises(JobError, match=r"the run writes about .* GB free. Fix: free some space"):
        run_job(load_job(data=job), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_full_disk_mid_run_is_one_line_and_the_run_is_marked_failed(job_assets, tmp_path,
                                                                      monkeypatch):
    import errno

    from prune_plugin.integrations import job as job_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "x.png"))
    monkeypatch.setattr(job_module, "plot_sparsity", full)
    with pytest.raises(JobError, match=r"writing the run failed: No space left on device.*"
                                       r"Fix: free some space") as info:
        run_job(load_job(data=job_dict(job_assets, tmp_path / "run")), progress=False)
    assert "\n" not in str(info.value)
    assert RunFolder(tmp_path / "run").state() == "failed"


def test_a_model_that_needs_its_own_code_is_refused_without_running_it(job_assets, tmp_path):
    from .models import tiny_hf_folder

    model = tiny_hf_folder(tmp_path / "custom")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="mycustom", auto_map={"AutoConfig": "configuration_my.MyConfig"})
    (model / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (model / "configuration_my.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    job = job_dict(job_assets, tmp_path / "run")
    job["model"] = str(model)
    with pytest.raises(JobError, match=r"needs its own Python code \(trust_remote_code\)"):
        run_job(load_job(data=job), progress=False)
    assert not marker.exists() and not (tmp_path / "run").exists()


# -- resume checks the checkpoint and the settings against verified copies ---------------------

def _interrupted_run(job_assets, tmp_path: Path) -> tuple[dict, RunFolder]:
    job = job_dict(job_assets, tmp_path / "run")
    job["training"].update(max_steps=8, save_steps=2, logging_steps=2)
    run_job(load_job(data=job), progress=False)
    folder = RunFolder(tmp_path / "run")
    folder.set_state("running")  # as a kill leaves it
    return job, folder


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_refused_on_resume(job_assets, tmp_path):
    from prune_plugin.integrations.job.run_folder import mark_complete

    job, folder = _interrupted_run(job_assets, tmp_path)
    newest = folder.newest_complete_checkpoint()
    other = Path(job_assets["other_vocab"])  # 3 more tokens: another embedding shape
    for f in newest.glob("model*.safetensors"):
        f.unlink()
    for f in other.glob("*.safetensors"):
        (newest / f.name).write_bytes(f.read_bytes())
    (newest / "prune_plugin.complete.json").unlink()
    mark_complete(newest)  # a valid completeness marker over the wrong tensors
    with pytest.raises(JobError, match=r"does not belong to this run's model: .*word_embeddings"):
        run_job(load_job(data=job), resume=True, progress=False)


@pytest.mark.slow
def test_a_damaged_settings_file_does_not_skip_the_changed_settings_check(job_assets, tmp_path):
    job, folder = _interrupted_run(job_assets, tmp_path)
    (folder.path / "config.resolved.yaml").write_bytes(b"\x00\xff{{ not yaml")
    changed = load_job(data=job, overrides={"training.learning_rate": 5e-4})
    with pytest.raises(JobError, match=r"settings changed: training.learning_rate"):
        run_job(changed, resume=True, progress=False)


@pytest.mark.slow
def test_a_checkpoints_optimizer_state_of_another_shape_is_refused_on_resume(job_assets,
                                                                            tmp_path):
    """It reached AdamW's fused kernel, which aborted the process without a word."""
    from prune_plugin.integrations.job.run_folder import mark_complete

    job, folder = _interrupted_run(job_assets, tmp_path)
    newest = folder.newest_complete_checkpoint()
    saved = torch.load(newest / "optimizer.pt", weights_only=True)
    state = saved["optimizer"]["state"]
    first = next(iter(state))
    state[first]["exp_avg"] = torch.zeros(3, 3)
    torch.save(saved, newest / "optimizer.pt")
    (newest / "prune_plugin.complete.json").unlink()
    mark_complete(newest)
    with pytest.raises(JobError, match=r"optimizer state does not fit this model: exp_avg"):
        run_job(load_job(data=job), resume=True, progress=False)
    assert folder.state() == "failed"


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_before_training_starts_stops_at_once_in_one_line(job_assets, tmp_path, sig,
                                                                   code):
    """The other moment: the run folder is marked running and the model is loading, no step
    has run. The job stops before training, marks the run interrupted, and says there is no
    checkpoint to resume: one line, no traceback."""
    job = _job_file(job_assets, tmp_path, steps=300)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "prune_plugin", "fine-prune", str(job),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    status = tmp_path / "run" / "status.json"
    deadline = time.time() + 120
    while time.time() < deadline and not status.is_file():
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "--overwrite" in line]
    assert len(lines) == 1 and signal.Signals(sig).name in lines[0]
    assert json.loads(status.read_text())["state"] == "interrupted"
