"""DeepSpeed integration: config entry validation (in process), the exact sharded Top-v on 2
gloo ranks, and real multi-rank fine-pruning runs (ZeRO 0-3, checkpoints, two simulated
nodes) launched with torchrun on CPU. The launched runs are marked ``deepspeed``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prune_plugin import PolicyError, get_pruner
from prune_plugin.integrations import deepspeed as ds
from prune_plugin.selection import (TopVThreshold, mask_from_threshold, topv_count,
                                    topv_mask_reference, topv_thresholds)

from .launch import ROOT, free_port
from .launch import run_ranks as launch_ranks
from .launch import run_two_nodes
from .models import tiny_bert

WORKER = Path(__file__).with_name("ds_worker.py")


def _config(**entry) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
            "movement_pruning": {"method": "movement", "final_remaining": 0.1,
                                 "total_steps": 100, **entry}}


# -- the config entry ---------------------------------------------------------------------------

def test_entry_is_validated_with_the_policy_errors() -> None:
    with pytest.raises(PolicyError, match="(?s)movement_pruning.*final_remaining.*1.5"):
        ds.read_policy(_config(final_remaining=1.5))
    with pytest.raises(PolicyError, match="(?si)movement_pruning.*methd.*did you mean .method."):
        ds.read_policy({"movement_pruning": {"methd": "movement"}})
    with pytest.raises(PolicyError, match="mask_update_every"):
        ds.read_policy(_config(mask_update_every=4))


def test_whole_numbers_are_accepted_for_float_fields() -> None:
    # DeepSpeed's own parser writes 1.0 as 1; the entry must still validate.
    policy = ds.read_policy(_config(initial_remaining=1, score_lr=1))
    assert policy.initial_remaining == 1.0 and isinstance(policy.score_lr, float)
    assert ds.read_policy({"train_batch_size": 8}) is None


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ds.DeepSpeedConfigError, match="does not exist"):
        ds.load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ds.DeepSpeedConfigError, match="not valid JSON"):
        ds.load_config(bad)


def test_bad_entry_fails_before_anything_is_attached() -> None:
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for config, error in [(_config(final_remaining=2.0), PolicyError),
                          ({"train_batch_size": 2}, ds.DeepSpeedConfigError),
                          ({**_config(), "scheduler": {"type": "WarmupLR"}},
                           ds.DeepSpeedConfigError),
                          ({**_config(), "optimizer": {"type": "Lamb"}}, ds.DeepSpeedConfigError)]:
        with pytest.raises(error):
            ds.initialize(model=model, config=config)
        assert get_pruner(model) is None
        assert model.state_dict().keys() == before.keys()
    with pytest.raises(ds.DeepSpeedConfigError, match="both"):
        ds.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                      config={**_config(), "optimizer": {"type": "AdamW"}})
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        ds.initialize(model=model, optimizer=lambda params: None, config=_config())
    assert get_pruner(model) is None


def test_optimizer_block_builds_a_torch_optimizer() -> None:
    model = tiny_bert()
    config = {"optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.8, 0.9],
                                                        "weight_decay": 0.01,
                                                        "torch_adam": True}}}
    opt = ds._client_optimizer(model, None, config)
    assert isinstance(opt, torch.optim.AdamW) and "optimizer" not in config
    assert opt.defaults["lr"] == 3e-4 and opt.defaults["betas"] == (0.8, 0.9)


# -- the sharded Top-v across 2 real ranks -------------------------------------------------------

def _sharded_rank(rank: int, world: int, port: int, parts: list, groups: list, ks: list,
                  queue, sync_free: bool | None = None) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    shards = []
    for p in parts:  # ZeRO-3's layout: equal flat partitions, the last one padded
        size = -(-p.numel() // world)
        shards.append(p.reshape(-1)[rank * size:(rank + 1) * size])
    totals = [sum(parts[i].numel() for i in g) for g in groups]
    result = topv_thresholds(shards, groups, ks, lambda t: dist.all_reduce(t), totals=totals,
                             sync_free=sync_free)
    queue.put((rank, [(float(t.value), int(t.ties_kept), t.k) for t in result]))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("sync_free", [None, True], ids=["cpu-path", "device-path"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_topv_on_two_ranks_matches_a_gathered_topv(dtype: torch.dtype,
                                                           sync_free: bool | None) -> None:
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(n, generator=g).to(dtype) for n in (1001, 640, 7)]
    parts[1] = (parts[1] * 4).round() / 4  # massive ties at the threshold
    ctx = mp.get_context("spawn")
    for groups in ([[0], [1], [2]], [[0, 1, 2]]):  # local, global
        ks = [round(0.3 * sum(parts[i].numel() for i in grp)) for grp in groups]
        queue, port = ctx.Queue(), free_port()
        procs = [ctx.Process(target=_sharded_rank,
                             args=(r, 2, port, parts, groups, ks, queue, sync_free))
                 for r in range(2)]
        for p in procs:
            p.start()
        answers = dict(queue.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        assert answers[0] == answers[1]  # every rank agrees
        thresholds = [TopVThreshold(torch.tensor(v, dtype=dtype), torch.tensor(ties), k)
                      for v, ties, k in answers[0]]
        for grp, k in zip(groups, ks):
            reference = topv_mask_reference([parts[i] for i in grp], k)
            for i, ref in zip(grp, reference):
                assert torch.equal(mask_from_threshold(parts[i], thresholds[i]), ref)
            assert sum(int(mask_from_threshold(parts[i], thresholds[i]).sum())
                       for i in grp) == k


# -- real multi-rank runs ------------------------------------------------------------------------

def run_ranks(worker: Path, out: Path, *args: str, nproc: int = 2) -> None:
    """Run ``worker`` on ``nproc`` local ranks (torchrun), failing with its output."""
    launch_ranks(worker, "--out", str(out), *args, nproc=nproc)


def launch(tmp_path: Path, name: str, *args: str, nproc: int = 2) -> dict:
    out = tmp_path / f"{name}.pt"
    run_ranks(WORKER, out, *args, nproc=nproc)
    return torch.load(out)


def launch_two_nodes(tmp_path: Path, name: str, *args: str) -> dict:
    """Two torchrun invocations, one process each, joined on 127.0.0.1 like two nodes."""
    out = tmp_path / f"{name}.pt"
    run_two_nodes(WORKER, "--out", str(out), *args)
    return torch.load(out)


def _max_diff(a: dict, b: dict) -> float:
    assert a["state"].keys() == b["state"].keys()
    return max(float((a["state"][k] - b["state"][k]).abs().max()) for k in a["state"])


def _pattern_mismatch(a: dict, b: dict) -> int:
    return sum(int(((a["state"][k] == 0) != (b["state"][k] == 0)).sum())
               for k in a["state"] if k.endswith("weight"))


@pytest.mark.slow
@pytest.mark.deepspeed
def test_movement_under_every_zero_stage_matches(tmp_path: Path) -> None:
    """Stages 0-3 on 2 ranks (stage 1 as two simulated nodes), and stage 3 on 1 rank, train
    on the same global batches: same weights to fp32 tolerance, same masks, exact k kept,
    masks bitwise those of a Top-v on the gathered scores. Stage 3 also checkpoints at step
    3; resuming from there on 2 ranks gives bitwise the uninterrupted run."""
    ckpt = tmp_path / "ckpt"
    runs = {"s0": launch(tmp_path, "s0", "--stage", "0"),
            "s1": launch_two_nodes(tmp_path, "s1", "--stage", "1"),
            "s2": launch(tmp_path, "s2", "--stage", "2"),
            "s3": launch(tmp_path, "s3", "--stage", "3", "--save-at", "3", "--ckpt", str(ckpt)),
            "s3-1rank": launch(tmp_path, "s3w1", "--stage", "3", nproc=1)}
    resumed = launch(tmp_path, "s3r", "--stage", "3", "--resume", str(ckpt))
    ref = runs["s0"]
    for name, run in runs.items():
        assert run["step"] == run["global_steps"] == 6, name
        assert run["remaining"] == pytest.approx(0.25, abs=1e-3), name
        assert run["kept"] == ref["kept"], name
        assert run["gathered_mismatch"] == 0, name
        assert _max_diff(run, ref) < 1e-5, name
        # masks may differ only where scores tie within rounding; none do here
        assert _pattern_mismatch(run, ref) == 0, name
        assert not any(k.endswith("pruning_scores") for k in run["state"])
    assert resumed["global_steps"] == 6 and resumed["step"] == 6
    assert all(torch.equal(resumed["state"][k], runs["s3"]["state"][k])
               for k in resumed["state"])


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.parametrize("method", ["soft_movement", "l0"])
def test_regularised_methods_under_zero(tmp_path: Path, method: str) -> None:
    """The penalty lands on ZeRO's flat fp32 shards once per step: ZeRO-2/3 on 2 ranks give
    the stage-0 result."""
    ref = launch(tmp_path, "s0", "--stage", "0", "--method", method)
    run = launch(tmp_path, "s3", "--stage", "3" if method == "l0" else "2", "--method", method)
    assert run["kept"] == ref["kept"]
    assert _max_diff(run, ref) < 1e-5
    assert run["remaining"] < 1.0  # the penalty did prune


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.parametrize("method,options", [
    ("soft_movement", ["--control", "lambda"]), ("soft_movement", ["--control", "topv"]),
    ("l0", []),
    ("l0", ["--bf16"])])
def test_requested_sparsity_under_zero3_is_the_exact_gathered_topv(
        tmp_path: Path, method: str, options: list[str]) -> None:
    """Soft movement and L0 with final_remaining under ZeRO-3 on 2 ranks: the masks are
    bitwise the global Top-v of the gathered scores, round(v * n) of the weights (soft
    movement's lambda control: by the cool-down's projection; L0: every gate of the Top-v
    open, held by the cool-down's floor, in bf16 too, where the optimizer's fp32 master copy
    is not the model's scores)."""
    run = launch(tmp_path, "s3", "--stage", "3", "--method", method, "--target", "0.25",
                 *options)
    assert run["gathered_mismatch"] == 0
    k = round(0.25 * run["total"])
    assert sum(run["kept"].values()) == k  # as the report counts (gates, ties)
    exported = sum(int(torch.count_nonzero(run["state"][f"{name}.weight"])) for name in run["kept"])
    assert exported == k  # and as the finalized weights hold it


@pytest.mark.slow
@pytest.mark.deepspeed
def test_structured_pruning_from_the_config_entry_under_zero2_and_zero3(tmp_path: Path) -> None:
    """structure: hybrid in the DeepSpeed entry: ZeRO-2 and ZeRO-3 on 2 ranks keep the same
    heads and neurons as stage 0, exactly a quarter of each block's units, and the same
    finalized weights. Under ZeRO-3 the unit scores are partitioned like any parameter and
    gathered for every member's forward (registered as its external parameter); magnitude's
    unit norms are summed from each rank's flat slice of the weights."""
    ref = launch(tmp_path, "s0", "--stage", "0", "--structure", "hybrid")
    for stage in ("2", "3"):
        run = launch(tmp_path, f"s{stage}", "--stage", stage, "--structure", "hybrid")
        assert run["units"] == ref["units"] and len(run["units"]) == 4  # 2 blocks x (heads, FFN)
        for kind, kept, total in run["units"]:  # local Top-v over each block's units
            assert kept == topv_count(0.25, total) and kind in ("heads", "neurons")
        assert _max_diff(run, ref) < 1e-5
    magnitude = [launch(tmp_path, f"m{stage}", "--stage", stage, "--structure", "hybrid",
                        "--method", "magnitude") for stage in ("0", "3")]
    assert magnitude[1]["units"] == magnitude[0]["units"]
    assert _max_diff(*magnitude) < 1e-5


@pytest.mark.slow
@pytest.mark.deepspeed
def test_gpt2_conv1d_under_zero3_matches_stage_0(tmp_path: Path) -> None:
    """GPT-2's Conv1D layers (weights stored [in, out], the fused c_attn split into heads)
    under ZeRO-3: unstructured movement and hybrid heads and neurons keep what stage 0 keeps,
    with the same finalized weights."""
    for structure in ("unstructured", "hybrid"):
        ref = launch(tmp_path, f"g0-{structure}", "--stage", "0", "--model", "gpt2",
                     "--structure", structure)
        run = launch(tmp_path, f"g3-{structure}", "--stage", "3", "--model", "gpt2",
                     "--structure", structure)
        assert "error" not in run, run.get("error")
        assert run["units"] == ref["units"] and run["kept"] == ref["kept"]
        if structure == "hybrid":
            assert len(run["units"]) == 4
        assert _pattern_mismatch(run, ref) == 0 and _max_diff(run, ref) < 1e-5


@pytest.mark.slow
@pytest.mark.deepspeed
def test_zero3_bf16_global_magnitude_under_zero_init(tmp_path: Path) -> None:
    """A model built under zero.Init (weights already sharded when attached), bf16, global
    Top-v: exactly k kept over all layers, bitwise the gathered Top-v's mask."""
    run = launch(tmp_path, "zi", "--stage", "3", "--method", "magnitude", "--scope", "global",
                 "--bf16", "--zero-init", "--accumulation", "2")
    assert run["step"] == 6 and run["global_steps"] == 6  # accumulation micro-steps not counted
    assert run["gathered_mismatch"] == 0
    assert run["remaining"] == pytest.approx(0.25, abs=1e-4)


@pytest.mark.slow
@pytest.mark.deepspeed
def test_trainer_with_deepspeed_zero3_prunes_and_exports(tmp_path: Path) -> None:
    """PruningTrainer + TrainingArguments(deepspeed=ZeRO-3 config with the entry): the model
    comes from from_pretrained under zero.Init, pruning reaches its target, and the exported
    finalized model loads with stock transformers."""
    from transformers import AutoModelForSequenceClassification

    from prune_plugin import sparsity_report

    out = tmp_path / "hf"
    run_ranks(WORKER.with_name("hf_ds_worker.py"), out)
    result = json.loads((out / "result.json").read_text())
    assert result["zero_init"] and result["global_step"] == 8
    assert result["remaining"][-1] == pytest.approx(0.3, abs=2e-3)
    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert not any("pruning_scores" in k for k in model.state_dict())
    assert sparsity_report(model).remaining == pytest.approx(0.3, abs=2e-3)


@pytest.mark.slow
@pytest.mark.deepspeed
def test_the_deepspeed_example_prunes_to_its_target_and_saves_a_stock_model(tmp_path: Path
                                                                           ) -> None:
    """examples/deepspeed_zero3.py, as docs/distributed.md says to run it (2 ranks, ZeRO-3
    from the config entry): 10% kept at the end, and the saved model loads with its class."""
    from transformers import BertForSequenceClassification

    from prune_plugin import sparsity_report as plain_report

    out = launch_ranks(ROOT / "examples" / "deepspeed_zero3.py", "--out",
                       str(tmp_path / "model"))
    assert "remaining: 10.00% of the pruned weights" in out
    model = BertForSequenceClassification.from_pretrained(tmp_path / "model")
    assert not any("pruning" in k for k in model.state_dict())
    assert plain_report(model).remaining == pytest.approx(0.10, abs=1e-3)


@pytest.mark.slow
@pytest.mark.deepspeed
def test_the_scores_lr_follows_the_weights_under_zero_1_and_2(tmp_path: Path) -> None:
    """ZeRO-1/2 show the optimizer one param group at a time while stepping, so the wrapper
    never saw both groups there; the engine's schedule slot makes the scores' lr follow: a
    OneCycleLR with a scalar max_lr (it writes every group's lr) leaves the scores at
    score_lr x weight lr / the weight lr when wrapped."""
    for stage in ("1", "2"):
        run = launch(tmp_path, f"lr{stage}", "--stage", stage, "--onecycle")
        lrs = run["lrs"]
        assert lrs["weight"] != pytest.approx(1e-3)  # the schedule moved it
        assert lrs["score"] == pytest.approx(lrs["score_lr"] * lrs["weight"] / lrs["base"])
