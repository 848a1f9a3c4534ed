"""The training step never reads a tensor back to the host on an accelerator.

A read back (``.item()``, ``.tolist()``, ``nonzero``, a numpy conversion, ``bool(tensor)``)
makes the host wait for the device's queue to drain, once per read: on a GPU that stalls the
step. ``FakeTensorMode`` raises on every such read, so running the device path under it on a
CPU machine proves the step has none. The device path is forced on CPU tensors here (a
CPU-only torch cannot fake CUDA tensors of a whole model); it must also give the same masks
as the CPU path.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from prune_plugin import PruningOptimizer, PruningPolicy
from prune_plugin.pruner import Pruner
from prune_plugin import selection
from prune_plugin.selection import (TopVThreshold, mask_from_threshold, topv_mask_reference,
                                    topv_rows, topv_thresholds)

from .models import bert_batch, tiny_bert

CASES = [("magnitude", "local"), ("magnitude", "global"), ("movement", "local"),
         ("movement", "global"), ("soft_movement", None), ("l0", None),
         ("soft_movement", "target"), ("soft_movement", "target-topv"), ("l0", "target"),
         ("movement", "hybrid"),
         ("l0", "hybrid")]


def _policy(method: str, scope: str | None) -> PruningPolicy:
    fields = dict(method=method, total_steps=6, warmup_steps=0, cooldown_steps=1)
    if scope in ("target", "target-topv"):  # a requested sparsity: a global Top-v from the
        # first refresh on (soft movement's lambda control: with its threshold)
        fields.update(initial_remaining=0.6, final_remaining=0.25, final_lambda=100.0)
        if method == "soft_movement":
            fields.update(remaining_control="topv" if scope == "target-topv" else "lambda")
    elif scope == "hybrid":  # structured: heads and neurons
        fields.update(structure="hybrid", score_init="uniform", score_init_value=1.0)
        fields.update(initial_remaining=0.6, final_remaining=0.25) if method == "movement" \
            else fields.update(final_lambda=100.0)
    elif scope is not None:  # Top-v selections from the first refresh on
        fields.update(scope=scope, initial_remaining=0.6, final_remaining=0.25)
    elif method == "soft_movement":
        fields.update(initial_threshold=0.3, final_threshold=0.6, final_lambda=100.0)
    else:
        fields.update(final_lambda=100.0)
    return PruningPolicy(**fields)


def _train(model, opt, steps: int) -> None:
    for step in range(steps):
        model(**bert_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("method,scope", CASES)
def test_training_steps_never_read_back_from_the_device(method, scope, monkeypatch):
    monkeypatch.setattr(Pruner, "device_path", True)
    with FakeTensorMode():  # raises on any read back to the host
        model = tiny_bert()
        opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), _policy(method, scope),
                               model=model)
        _train(model, opt, 3)  # forward, backward, penalty, update, schedule, mask refresh
        model.eval()
        with torch.no_grad():  # evaluation, with the cached masked weights
            model(**bert_batch(seed=9)).logits.sum()
            model(**bert_batch(seed=9)).logits.sum()
    assert opt.pruner.step_count == 3


def test_the_sharded_radix_select_never_reads_back() -> None:
    with FakeTensorMode():
        parts = [torch.randn(300), torch.randn(77), torch.randn(5)]
        for groups in ([[0], [1], [2]], [[0, 1, 2]]):
            ks = [round(0.3 * sum(parts[i].numel() for i in g)) for g in groups]
            totals = [sum(parts[i].numel() for i in g) for g in groups]
            thresholds = topv_thresholds(parts, groups, ks, totals=totals, sync_free=True)
            for part, threshold in zip(parts, thresholds):
                mask_from_threshold(part, threshold)


@pytest.mark.parametrize("method,scope", CASES)
def test_device_path_trains_exactly_like_the_cpu_path(method, scope, monkeypatch):
    def run(device_path: bool):
        monkeypatch.setattr(Pruner, "device_path", device_path)
        torch.manual_seed(0)
        model = tiny_bert()
        opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2),
                               _policy(method, scope), model=model)
        _train(model, opt, 5)
        return model.state_dict(), [layer.gate() for layer in opt.pruner.layers]

    (state_a, gates_a), (state_b, gates_b) = run(False), run(True)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    for a, b in zip(gates_a, gates_b):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_device_selection_writes_the_masks_in_place_and_saves_them_alone(scope, monkeypatch,
                                                                          tmp_path) -> None:
    """The device path's selection writes every mask into one joint buffer the layers hold
    views of (no copy per layer, the buffer reused from step to step); what is saved is each
    layer's mask alone, equal to the view (save_pretrained keeps one of tensors that share
    memory)."""
    from safetensors.torch import save_file

    from prune_plugin import load_pruning_state, save_pruning_state

    monkeypatch.setattr(Pruner, "device_path", True)
    torch.manual_seed(0)
    model = tiny_bert()
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2),
                           _policy("movement", scope), model=model)
    _train(model, opt, 2)
    layers = opt.pruner.layers
    joint = layers[0].mask._base
    assert joint is not None and sum(layer.mask._base is joint for layer in layers) > 1
    storages = {layer.mask.untyped_storage().data_ptr() for layer in layers}
    _train(model, opt, 1)
    assert {layer.mask.untyped_storage().data_ptr() for layer in layers} == storages
    state = model.state_dict()
    masks = {k: v for k, v in state.items() if k.endswith(".pruning_mask")}
    assert len(masks) == len(layers)  # each alone in its memory
    assert all(m.untyped_storage().nbytes() == m.numel() for m in masks.values())
    for layer in layers:
        assert torch.equal(state[f"{layer.name}.pruning_mask"], layer.mask)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    kept = [layer.mask.clone() for layer in layers]
    save_pruning_state(opt, tmp_path / "pruning.safetensors")
    for layer in layers:
        layer.mask.fill_(True)
    load_pruning_state(opt, tmp_path / "pruning.safetensors")
    assert all(torch.equal(layer.mask, mask) for layer, mask in zip(layers, kept))


@pytest.mark.parametrize("kind", ["normal", "ties", "bf16"])
def test_topv_rows_equals_the_stable_sort_reference(kind) -> None:
    g = torch.Generator().manual_seed(7)
    for _ in range(40):
        rows, n = int(torch.randint(1, 5, (), generator=g)), int(torch.randint(1, 400, (), generator=g))
        x = torch.randn(rows, n, generator=g)
        if kind == "ties":
            x = (x * 2).round() * 0.01
        elif kind == "bf16":
            x = x.bfloat16()
        k = int(torch.randint(0, n + 1, (), generator=g))
        masks = topv_rows(x, k)
        assert masks.dtype == torch.bool and int(masks.sum()) == rows * k
        for row, mask in zip(x, masks):
            assert torch.equal(mask, topv_mask_reference([row], k)[0])


@pytest.mark.parametrize("block", [1, 4, 16])
@pytest.mark.parametrize("kind", ["ties", "bf16", "normal"])
def test_topv_rows_counted_in_blocks_keeps_the_references_ties(kind, block, monkeypatch) -> None:
    """Ties counted per block: the kept ties end inside one block (or at a block's edge, or
    fill every block), from either end of topk; the same masks as the stable sort."""
    monkeypatch.setattr(selection, "TIE_BLOCK", block)
    g = torch.Generator().manual_seed(block)
    for _ in range(60):
        rows, n = int(torch.randint(1, 4, (), generator=g)), 16 * int(torch.randint(1, 9, (), generator=g))
        x = (torch.randn(rows, n, generator=g) * 1.5).round() * 0.25  # a few values, many ties
        if kind == "bf16":
            x = x.bfloat16()
        elif kind == "normal":
            x = torch.randn(rows, n, generator=g)
        k = int(torch.randint(0, n + 1, (), generator=g))
        masks = topv_rows(x, k)
        for row, mask in zip(x, masks):
            assert torch.equal(mask, topv_mask_reference([row], k)[0]), (n, k)


def test_threshold_masks_counted_in_blocks_keep_the_first_ties(monkeypatch) -> None:
    monkeypatch.setattr(selection, "TIE_BLOCK", 8)
    x = torch.tensor([3.0, 1.0, 2.0, 2.0] * 12)  # 48 scores, 2.0 at 24 places
    for ties in range(25):
        mask = mask_from_threshold(x, TopVThreshold(torch.tensor(2.0), torch.tensor(ties), 0))
        assert torch.equal(mask, topv_mask_reference([x], 12 + ties)[0]), ties


def test_topv_rows_counted_in_blocks_keeps_exactly_k_of_infinite_ties(monkeypatch) -> None:
    """Nothing is above +Inf: blocks past the kept ties must not keep an Inf (a diverged run
    is stopped a step later on an accelerator; its masks meanwhile still keep exactly k)."""
    monkeypatch.setattr(selection, "TIE_BLOCK", 4)
    x = torch.tensor([[math.inf, 1.0, -math.inf, math.inf] * 8])
    for k in range(33):
        assert torch.equal(topv_rows(x, k)[0], topv_mask_reference([x[0]], k)[0]), k


def test_topv_rows_counted_in_blocks_stays_exact_where_denormals_flush_to_zero() -> None:
    """Blocks past the kept ties compare x >= the float after t: where denormals are flushed
    (some accelerators; the CPU with set_flush_denormal) the float after 0 reads as 0, and every
    zero would be kept."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        zeros = torch.zeros(2, 16384)
        mixed = torch.randn(2, 16384, generator=torch.Generator().manual_seed(5))
        mixed[:, ::3] = 0.0
        for x in (zeros, mixed, mixed.bfloat16()):
            for k in (1, 4096, 9000, 16383):
                masks = topv_rows(x, k)
                for row, mask in zip(x, masks):
                    assert torch.equal(mask, topv_mask_reference([row], k)[0]), k
        mask = mask_from_threshold(torch.zeros(64, 256),
                                   TopVThreshold(torch.tensor(0.0), torch.tensor(100), 100))
        assert int(mask.sum()) == 100
    finally:
        torch.set_flush_denormal(False)


def test_a_threshold_made_elsewhere_masks_scores_on_their_device() -> None:
    """A threshold's 0-d tensors on another device than the scores (the meta device stands in
    for an accelerator) still give the scores' mask, on their device."""
    mask = mask_from_threshold(torch.randn(64, 64, device="meta"),
                               TopVThreshold(torch.tensor(0.5), torch.tensor(0), 0))
    assert mask.device.type == "meta" and mask.shape == (64, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sync_free_sharded_select_equals_the_reference(dtype) -> None:
    g = torch.Generator().manual_seed(8)
    for trial in range(30):
        parts = [torch.randn(int(n), generator=g).to(dtype)
                 for n in torch.randint(1, 300, (3,), generator=g)]
        if trial % 2:
            parts = [(p * 2).round() / 2 for p in parts]  # many ties
        for groups in ([[0], [1], [2]], [[0, 1, 2]]):
            ks = [int(torch.randint(0, sum(parts[i].numel() for i in grp) + 1, (), generator=g))
                  for grp in groups]
            thresholds = topv_thresholds(parts, groups, ks, sync_free=True)
            for grp, k in zip(groups, ks):
                for i, ref in zip(grp, topv_mask_reference([parts[i] for i in grp], k)):
                    assert torch.equal(mask_from_threshold(parts[i], thresholds[i]), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method,scope", CASES)
def test_cuda_step_is_silent_under_sync_debug_mode(method, scope) -> None:
    model = tiny_bert().cuda()
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True),
                           _policy(method, scope), model=model)
    batch = {k: v.cuda() for k, v in bert_batch().items()}
    for _ in range(3):
        model(**batch).loss.backward()  # the model's own forward may sync; the step may not
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
            opt.zero_grad()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert opt.pruner.step_count == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method,scope", CASES)
def test_cuda_compiled_passes_train_as_the_eager_ones(method, scope, monkeypatch) -> None:
    # CUDA runs the per-layer elementwise passes (prune_plugin::*) compiled; the eager ops
    # (COMPILE_ON_CUDA off) must give the same losses to rounding and the same kept counts
    from prune_plugin import masks

    runs = []
    for compiled in (True, False):
        monkeypatch.setattr(masks, "COMPILE_ON_CUDA", compiled)
        torch.manual_seed(0)
        model = tiny_bert().cuda()
        opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True),
                               _policy(method, scope), model=model)
        losses = []
        for step in range(4):
            torch.manual_seed(100 + step)  # L0's noise
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**{k: v.cuda() for k, v in bert_batch(seed=step).items()}).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
        runs.append((losses, opt.pruner.kept_counts()))
    (compiled_losses, compiled_kept), (eager_losses, eager_kept) = runs
    assert compiled_losses == pytest.approx(eager_losses, rel=2e-2)
    assert sum(compiled_kept) == pytest.approx(sum(eager_kept), rel=2e-2)
    assert masks._COMPILED and all(c is not getattr(masks, name)  # the compiled path ran
                                   for name, c in masks._COMPILED.items())
