"""Pruning on 2 gloo ranks: DDP and FSDP2 in either order give every rank the same model,
and the model one process gives with the same global batch.

Each spawn starts 2 ranks once and runs a list of cases (``tests/dist_worker.py``); the
one-process references run here. Engines the plugin cannot follow are refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from prune_plugin import AttachError, PruningOptimizer, PruningPolicy, attach, get_pruner

from . import dist_worker
from .launch import ROOT, free_port, run_ranks, run_two_nodes
from .models import MLP

WORLD = 2


def spawn(tmp_path: Path, cases: list[dict[str, Any]], world: int = WORLD
          ) -> dict[str, list[dict[str, Any]]]:
    """Run ``cases`` on ``world`` ranks; each case's results, rank by rank."""
    ctx = mp.start_processes(dist_worker.ranks, args=(world, free_port(), cases, str(tmp_path)),
                             nprocs=world, join=False, start_method="spawn")
    while not ctx.join(timeout=600):
        pass
    return {case["name"]: [torch.load(tmp_path / f"{case['name']}.{rank}.pt", weights_only=False)
                           for rank in range(world)] for case in cases}


def single(case: dict[str, Any]) -> dict[str, Any]:
    """The same run in this process, with the whole global batch per step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return dist_worker.run_case({**case, "setup": "single"}, rank=0, world=1)
    finally:
        torch.set_num_threads(threads)


def assert_ranks_equal(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert "error" not in r, r.get("traceback")
    first = results[0]
    for other in results[1:]:
        assert other["step"] == first["step"] == dist_worker.STEPS
        assert other["kept"] == first["kept"]
        assert other["state"].keys() == first["state"].keys()
        for key, value in first["state"].items():
            assert torch.equal(value, other["state"][key]), f"ranks differ in {key}"


def assert_same_model(result: dict[str, Any], ref: dict[str, Any], atol: float = 1e-5) -> None:
    """The same masks (zeros) and the same weights, up to the order of the sums."""
    assert result["kept"] == ref["kept"]
    assert result["state"].keys() == ref["state"].keys()
    for key, value in ref["state"].items():
        got = result["state"][key]
        if value.is_floating_point():
            assert torch.equal(got == 0, value == 0), f"masks differ in {key}"
            assert torch.allclose(got, value, atol=atol, rtol=0), \
                f"{key}: {float((got - value).abs().max())}"
        else:
            assert torch.equal(got, value), key


def _kept_fraction(result: dict[str, Any]) -> float:
    return sum(result["kept"]) / sum(result["total"])


DDP_CASES = [
    {"name": "ddp-attach-first", "setup": "ddp-attach-first"},
    {"name": "ddp-wrap-first", "setup": "ddp-wrap-first"},
    {"name": "ddp-wrap-first-accumulation", "setup": "ddp-wrap-first", "micros": 2},
    {"name": "ddp-wrap-first-l0", "setup": "ddp-wrap-first", "method": "l0"},
    {"name": "ddp-wrap-first-hybrid", "setup": "ddp-wrap-first",
     "policy": {"structure": "hybrid"}},
    {"name": "ddp-wrap-first-gpt2-hybrid", "setup": "ddp-wrap-first", "model": "gpt2",
     "policy": {"structure": "hybrid"}},
    {"name": "ddp-inner-given", "setup": "ddp-inner-given"},
]


def test_ddp_either_order_gives_every_rank_the_one_process_model(tmp_path: Path) -> None:
    """DDP built after attaching averages the scores' gradients itself; built before, the
    plugin does (one bucketed all-reduce per backward, skipped under no_sync like DDP's own).
    Either way both ranks end bitwise equal, with the masks and weights of one process
    training on the whole batch. Given the module inside a DDP built first, the plugin cannot
    see DDP: the first step finds the ranks apart and stops with the fix."""
    runs = spawn(tmp_path, DDP_CASES)
    for case in DDP_CASES[:-1]:
        results = runs[case["name"]]
        assert_ranks_equal(results)
        assert_same_model(results[0], single(case))
    refused = runs["ddp-inner-given"]
    for r in refused:
        assert "AttachError" in r["error"] and "Fix: pass the DDP wrapper" in r["error"]


FSDP_CASES = [
    {"name": f"fsdp-{order}-{label}", "setup": f"fsdp-{order}", **extra}
    for order in ("attach-first", "shard-first")
    for label, extra in [("movement-local", {}),
                         ("movement-global", {"scope": "global"}),
                         ("magnitude", {"method": "magnitude"}),
                         ("soft-movement", {"method": "soft_movement"}),
                         ("l0", {"method": "l0"}),
                         ("movement-hybrid", {"policy": {"structure": "hybrid"}}),
                         ("magnitude-hybrid", {"method": "magnitude",
                                               "policy": {"structure": "hybrid"}}),
                         ("l0-hybrid", {"method": "l0", "policy": {"structure": "hybrid"}}),
                         # the pooler too: a pruned Linear under the root's fully_shard alone
                         ("movement-root-layer", {"policy": {"exclude": []}}),
                         # transformers' Conv1D, stored [in, out], sharded on its first dim
                         ("gpt2-movement", {"model": "gpt2"}),
                         ("gpt2-hybrid", {"model": "gpt2", "policy": {"structure": "hybrid"}})]]


@pytest.mark.slow
def test_fsdp2_either_order_gives_every_rank_the_one_process_model(tmp_path: Path) -> None:
    """FSDP2 (fully_shard on each block and the root), attached before or after sharding:
    the scores are DTensor shards like their weights, masks come from the exact sharded Top-v
    (no rank holds a whole layer's scores between forwards), and every method ends with the
    same finalized model on both ranks as in one process. Structured pruning (hybrid: heads and
    FFN neurons) selects on whole unit importances: the few unit scores gathered (or, attached
    after sharding, kept whole and averaged by the plugin), magnitude's unit norms reduced shard
    by shard."""
    runs = spawn(tmp_path, FSDP_CASES)
    for case in FSDP_CASES:
        results = runs[case["name"]]
        assert_ranks_equal(results)
        assert results[0]["sharding"] == "FSDP2"
        # the stock class, strict
        dist_worker.build_model(case.get("model", "bert")).load_state_dict(results[0]["state"])
        ref = single(case)
        assert_same_model(results[0], ref, atol=1e-4 if case.get("method") == "l0" else 1e-5)
        unstructured = "structure" not in case.get("policy", {})
        if unstructured and case.get("method") != "soft_movement":  # exactly v_f
            assert _kept_fraction(results[0]) == pytest.approx(0.25, abs=0.01)


@pytest.mark.slow
def test_fsdp2_checkpoint_resumes_bitwise(tmp_path: Path) -> None:
    """torch.distributed.checkpoint of the sharded model (scores, step) and optimizer, loaded
    into a rebuilt run at the same world size: the rest of the run is bitwise the run without a
    break, on both ranks."""
    case = {"name": "fsdp-resume", "setup": "fsdp-resume", "dir": str(tmp_path / "ckpt")}
    results = spawn(tmp_path, [case])["fsdp-resume"]
    for r in results:
        assert "error" not in r, r.get("traceback")
        assert r["loaded_step"] == dist_worker.STEPS // 2 and r["step"] == dist_worker.STEPS
        assert r["resumed"].keys() == r["whole"].keys()
        assert all(torch.equal(v, r["whole"][k]) for k, v in r["resumed"].items())
    assert all(torch.equal(v, results[1]["resumed"][k]) for k, v in results[0]["resumed"].items())


@pytest.mark.slow
def test_fsdp2_checkpoint_reshards_to_another_world_size(tmp_path: Path) -> None:
    """A sharded checkpoint written by 2 ranks loads into 1 (torch.distributed.checkpoint
    reshards by the tensors' global shapes): the same step and bitwise the same finalized model
    as the 2 ranks had when they saved."""
    ckpt = str(tmp_path / "ckpt")
    saved = spawn(tmp_path, [{"name": "save", "setup": "fsdp-save", "dir": ckpt}])["save"]
    loaded = spawn(tmp_path, [{"name": "load", "setup": "fsdp-load", "dir": ckpt}],
                   world=1)["load"]
    for r in saved + loaded:
        assert "error" not in r, r.get("traceback")
        assert r["step"] == dist_worker.STEPS // 2
    assert loaded[0]["state"].keys() == saved[0]["state"].keys()
    assert all(torch.equal(v, loaded[0]["state"][k]) for k, v in saved[0]["state"].items())


@pytest.mark.slow
def test_fsdp2_structured_run_shrinks_to_the_one_process_model(tmp_path: Path) -> None:
    """Hybrid movement under FSDP2, then its full state dict loaded into an unsharded copy
    attached with the same policy, and finalize(shrink=True) there: the same smaller Linears
    and the same logits as the run in one process shrunk directly."""
    case = {"name": "fsdp-shrink", "setup": "fsdp-shrink", "policy": {"structure": "hybrid"}}
    results = spawn(tmp_path, [case])["fsdp-shrink"]
    ref = dist_worker.run_shrink(case, rank=0, world=1)
    for r in results:
        assert "error" not in r, r.get("traceback")
        assert r["shapes"] == ref["shapes"]
        assert torch.allclose(r["logits"], ref["logits"], atol=1e-5, rtol=0)
    assert any(shape != full for shape, full in zip(
        ref["shapes"].values(), dict((n, tuple(p.shape)) for n, p in
                                     dist_worker.build_model().named_parameters()).values()))


# -- the example script, on one node and on two -------------------------------------------------

SCALE_OUT = ROOT / "examples" / "scale_out.py"


@pytest.mark.slow
def test_scale_out_example_two_nodes_on_loopback_equal_one_node(tmp_path: Path) -> None:
    """examples/scale_out.py under torchrun: FSDP2 on one node of 2 processes and on two nodes
    of one process each (two launcher invocations joined on 127.0.0.1) end with bitwise the same
    finalized model at 10% kept; DDP (built before the plugin) runs the same script to the
    same masks."""
    one, two, ddp = tmp_path / "one.pt", tmp_path / "two.pt", tmp_path / "ddp.pt"
    printed = run_ranks(SCALE_OUT, "--engine", "fsdp2", "--out", str(one))
    assert "10.00% of the pruned weights remain" in printed
    run_two_nodes(SCALE_OUT, "--engine", "fsdp2", "--out", str(two))
    run_ranks(SCALE_OUT, "--engine", "ddp", "--out", str(ddp))
    one_state, two_state, ddp_state = (torch.load(p) for p in (one, two, ddp))
    assert one_state.keys() == two_state.keys() == ddp_state.keys()
    for key, value in one_state.items():
        assert torch.equal(value, two_state[key]), key
        if value.is_floating_point():
            assert torch.equal(value == 0, ddp_state[key] == 0), key
            assert torch.allclose(value, ddp_state[key], atol=1e-5, rtol=0), key


# -- refused engines --------------------------------------------------------------------------

def test_data_parallel_is_refused_with_the_supported_engines_named() -> None:
    model = MLP()
    policy = PruningPolicy(method="movement", final_remaining=0.5, total_steps=4)
    with pytest.raises(AttachError, match="(?s)DataParallel.*Fix: use DistributedDataParallel"
                                          ".*FSDP2"):
        PruningOptimizer(torch.optim.AdamW(model.parameters()), policy, model=nn.DataParallel(model))
    assert get_pruner(model) is None and not any("pruning" in k for k in model.state_dict())


def test_finalize_under_sharding_is_refused_and_changes_nothing() -> None:
    from prune_plugin.distributed import Sharding

    class Shards(Sharding):
        shards = True
        name = "FSDP2"

    model = MLP()
    pruner = attach(model, PruningPolicy(method="movement", final_remaining=0.5, total_steps=4))
    pruner.use_sharding(Shards())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AttachError, match="(?s)FSDP2.*Fix: .*finalized_state_dict"):
        pruner.finalize()
    assert get_pruner(model) is pruner
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_trainer_fsdp_arguments_are_refused_with_the_fix() -> None:
    """The Trainer's fsdp arguments (accelerate's FSDP1, or its FSDP2 path, untested with the
    scores) are refused before training, naming the loop and DeepSpeed paths that work."""
    from types import SimpleNamespace

    from prune_plugin.integrations.transformers import check_fsdp

    def trainer(version: int | None) -> SimpleNamespace:
        plugin = None if version is None else SimpleNamespace(fsdp_version=version)
        return SimpleNamespace(is_fsdp_enabled=version is not None,
                               accelerator=SimpleNamespace(state=SimpleNamespace(
                                   fsdp_plugin=plugin)))

    for version, why in ((1, "flattens the weights"), (2, "not yet tested")):
        with pytest.raises(ValueError, match=f"(?s)FSDP{version}.*{why}.*Fix: call "
                                             "torch.distributed.fsdp.fully_shard.*DeepSpeed"):
            check_fsdp(trainer(version))
    check_fsdp(trainer(None))  # no fsdp arguments: nothing to refuse
