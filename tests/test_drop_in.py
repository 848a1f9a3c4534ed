"""One line added to a training loop the user already has: it works, or fails at once with
the fix. One test per case of issue 11's table (schedulers, accelerate, GradScaler, deepcopy,
model-only checkpoints, torch.compile, PEFT, heads, GPT-2, Adafactor, eval speed)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from prune_plugin import (AttachError, PruningOptimizer, PruningPolicy, TargetingError, attach,
                          finalize, get_pruner, sparsity_report)
from prune_plugin.hooks import MASK_KEY, SCORES_NAME

from .models import MLP, bert_batch, mlp_batch, tiny_bert


def movement(**kw) -> PruningPolicy:
    return PruningPolicy(**{**dict(method="movement", final_remaining=0.25, warmup_steps=1,
                                   cooldown_steps=1, total_steps=8), **kw})


def bert_step(model, opt, seed: int) -> None:
    model(**bert_batch(seed=seed)).loss.backward()
    opt.step()
    opt.zero_grad()


# -- schedulers, accelerate, GradScaler ----------------------------------------------------------

@pytest.mark.parametrize("build", ["torch", "transformers"])
def test_a_scheduler_built_before_wrapping_is_refused_with_the_fix(build):
    model = tiny_bert()
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if build == "torch":
        torch.optim.lr_scheduler.LambdaLR(base, lambda s: 1.0)
    else:
        from transformers import get_linear_schedule_with_warmup
        get_linear_schedule_with_warmup(base, 2, 8)
    with pytest.raises(AttachError, match=r"(?s)scheduler was already built.*Fix: wrap first"):
        PruningOptimizer(base, movement(), model=model)
    assert get_pruner(model) is None and len(base.param_groups) == 1  # nothing changed
    # The fix: wrap, then build the scheduler; it schedules the scores' group too.
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), movement(), model=model)
    from transformers import get_linear_schedule_with_warmup
    sched = get_linear_schedule_with_warmup(opt, 2, 8)
    for i in range(4):
        bert_step(model, opt, i)
        sched.step()
    assert opt.score_group()["lr"] == pytest.approx(1e-2 * 4 / 6)


def test_accelerate_prepare_then_wrap_counts_real_steps_and_one_penalty_each(monkeypatch):
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=4, cpu=True)
    model = tiny_bert()
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, base = accelerator.prepare(model, base)
    policy = PruningPolicy(method="soft_movement", total_steps=8, final_lambda=100.0)
    opt = PruningOptimizer(base, policy, model=model)
    penalties = []
    original = opt.pruner.add_penalty_grads
    monkeypatch.setattr(opt.pruner, "add_penalty_grads",
                        lambda params: (penalties.append(opt.step_count), original(params)))
    for micro in range(32):
        with accelerator.accumulate(model):
            accelerator.backward(model(**bert_batch(seed=micro)).loss)
            opt.step()
            opt.zero_grad()
    assert opt.step_count == 8  # 32 micro-steps, 8 real ones
    assert penalties == list(range(8))  # the penalty once per real step, before it


def test_a_step_grad_scaler_skips_is_not_counted():
    model = MLP()
    opt = PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), movement(), model=model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = mlp_batch()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    model.fc1.weight.grad[0, 0] = float("inf")  # an overflow: GradScaler skips this step
    scores = model.fc1.pruning_scores.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert opt.step_count == 0 and torch.equal(model.fc1.pruning_scores, scores)
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    assert opt.step_count == 1


# -- copies and checkpoints ---------------------------------------------------------------------

def test_deepcopy_of_an_attached_model_is_an_independent_pruned_copy():
    model = tiny_bert()
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), movement(), model=model)
    for i in range(4):
        bert_step(model, opt, i)
    teacher = copy.deepcopy(model)  # EMA, teacher, "best model": a copy of the pruned model
    model.eval(), teacher.eval()
    batch = bert_batch(seed=9)
    assert torch.equal(teacher(**batch).logits, model(**batch).logits)
    copied = get_pruner(teacher)
    assert copied is not opt.pruner and copied.step_count == 4
    assert all(a.module is not b.module for a, b in zip(copied.layers, opt.pruner.layers))
    finalize(teacher)  # does not touch the original
    query = model.bert.encoder.layer[0].attention.self.query
    assert get_pruner(model) is opt.pruner and "forward" in query.__dict__
    assert MASK_KEY in "".join(model.state_dict()) and opt.score_group() is not None
    model.train()
    bert_step(model, opt, 5)
    assert opt.step_count == 5


def test_deepcopy_of_the_optimizer_gives_a_working_copy():
    model = tiny_bert()
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), movement(), model=model)
    bert_step(model, opt, 0)
    clone = copy.deepcopy(opt)
    assert clone.pruner is not opt.pruner and clone.step_count == 1
    clone_model = clone.pruner.model
    bert_step(clone_model, clone, 1)
    assert clone.step_count == 2 and opt.step_count == 1


@pytest.mark.parametrize("strict", [True, False])
def test_masks_and_step_survive_a_model_only_checkpoint(strict, tmp_path):
    model = tiny_bert()
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), movement(), model=model)
    for i in range(5):
        bert_step(model, opt, i)
    model.save_pretrained(tmp_path)  # an attached model's checkpoint carries scores and masks
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert int(saved["pruning_step"]) == 5

    fresh = tiny_bert(seed=3)
    fresh_opt = PruningOptimizer(torch.optim.AdamW(fresh.parameters(), lr=1e-2), movement(),
                                 model=fresh)
    fresh.load_state_dict(saved, strict=strict)
    assert fresh_opt.step_count == 5
    for a, b in zip(opt.pruner.layers, fresh_opt.pruner.layers):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.scores, b.scores)
    model.eval(), fresh.eval()
    batch = bert_batch(seed=7)
    assert torch.equal(model(**batch).logits, fresh(**batch).logits)
    assert sparsity_report(fresh).remaining == pytest.approx(sparsity_report(model).remaining)


def test_a_plain_checkpoint_loads_into_an_attached_model_strictly():
    plain = tiny_bert(seed=4)
    model = tiny_bert()
    PruningOptimizer(torch.optim.AdamW(model.parameters()), movement(), model=model)
    model.load_state_dict(plain.state_dict())  # no missing-key error for the scores
    assert torch.equal(model.classifier.weight, plain.classifier.weight)


def test_a_damaged_mask_in_a_checkpoint_is_an_error():
    model = tiny_bert()
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters()), movement(initial_remaining=0.5),
                           model=model)
    state = model.state_dict()
    key = next(k for k in state if k.endswith(MASK_KEY))
    state[key] = state[key][:3]
    step_before = opt.step_count
    with pytest.raises(RuntimeError, match="pruning_mask"):
        model.load_state_dict(state)
    assert opt.step_count == step_before


def test_reports_see_through_torch_compile():
    model = tiny_bert()
    PruningOptimizer(torch.optim.AdamW(model.parameters()), movement(initial_remaining=0.5),
                     model=model)
    compiled = torch.compile(model)
    assert get_pruner(compiled) is get_pruner(model)
    assert sparsity_report(compiled).remaining == pytest.approx(0.5, abs=1e-3)
    assert [lay.name for lay in sparsity_report(compiled).layers] == \
        [lay.name for lay in sparsity_report(model).layers]


def _train_compiled_or_not(policy: PruningPolicy, compiled: bool, steps: int):
    """``steps`` optimizer steps of a dropout-free tiny BERT, through ``torch.compile`` (the
    aot_eager backend: dynamo and AOT autograd, no C++ toolchain) or eagerly."""
    model = tiny_bert()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), policy, model=model)
    run = torch.compile(model, backend="aot_eager") if compiled else model
    model.train()
    losses = []
    for step in range(steps):
        loss = run(**bert_batch(seed=step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return model, opt, losses


def test_training_through_torch_compile_is_training_without_it():
    # the one line also works under torch.compile: same losses, same masks, every step
    policy = movement(total_steps=6, warmup_steps=1, cooldown_steps=1, final_remaining=0.3)
    _, eager_opt, eager_losses = _train_compiled_or_not(policy, compiled=False, steps=6)
    model, opt, losses = _train_compiled_or_not(policy, compiled=True, steps=6)
    assert losses == pytest.approx(eager_losses, rel=1e-4)
    assert sparsity_report(model).remaining == pytest.approx(0.3, abs=1e-3)
    for a, b in zip(opt.pruner.layers, eager_opt.pruner.layers):
        assert torch.equal(a.gate(), b.gate())


@pytest.mark.slow
@pytest.mark.parametrize("fields", [
    dict(method="magnitude"), dict(method="soft_movement"),
    dict(method="l0"), dict(method="l0", l0_warmup_gates="open")])
def test_every_method_trains_through_torch_compile(fields):
    # L0 samples its gates inside the compiled graph, so compiled and eager runs draw differently:
    # what must hold is the requested count, evaluation equal to the finalized model, and
    # recompiles once a phase of the schedule (warm-up, pruning, cool-down), not once a step
    # (the forwards read no step count: after 8 recompiles dynamo falls back to eager)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    policy = PruningPolicy(total_steps=10, warmup_steps=2, cooldown_steps=2, final_remaining=0.3,
                           **fields)
    model, opt, losses = _train_compiled_or_not(policy, compiled=True, steps=10)
    assert all(math.isfinite(x) for x in losses)
    # the first graph, transformers' problem_type set on the first call, then one per change
    # the forwards see (the first mask, L0's open gates closing, the cool-down's floor); one a
    # step would be 10
    assert counters["stats"]["unique_graphs"] <= 5
    assert sparsity_report(model).remaining == pytest.approx(0.3, abs=1e-3)
    batch = {k: v for k, v in bert_batch(seed=9).items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        masked = model(**batch).logits
        finalize(model)
        assert torch.allclose(model(**batch).logits, masked, atol=1e-5)


# -- which layers are pruned ---------------------------------------------------------------------

def test_peft_adapters_are_never_pruned_and_merge_keeps_the_sparsity():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query", "value"]))
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), movement(),
                           model=model)
    names = [layer.name for layer in opt.pruner.layers]
    assert not any("lora_" in n for n in names)
    assert any(n.endswith("query.base_layer") for n in names)
    for i in range(8):
        bert_step(model, opt, i)
    merged = model.merge_and_unload()  # the base layers (with our forward) stay in the model
    finalize(merged)
    query = merged.bert.encoder.layer[0].attention.self.query
    assert type(query) is nn.Linear
    assert int(torch.count_nonzero(query.weight)) == round(0.25 * query.weight.numel())


def test_heads_are_excluded_by_structure_not_only_by_name():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                              max_position_embeddings=64)
    torch.manual_seed(0)
    distil = DistilBertForSequenceClassification(config)
    names = [layer.name for layer in attach(distil, movement()).layers]
    assert "pre_classifier" not in names and "classifier" not in names
    assert all(n.startswith("distilbert.") for n in names) and len(names) == 6

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(),
                        nn.Linear(16, 3))  # names "0", "2", "4": no name says "head"
    assert [layer.name for layer in attach(mlp, movement()).layers] == ["0", "2"]
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3))
    assert [layer.name for layer in attach(mlp, movement(exclude_heads=False)).layers] == \
        ["0", "2"]


def test_a_transformer_block_keeps_its_last_linear_targeted():
    class Block(nn.Module):  # the FFN's output joins the residual stream: it is no head
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down, self.norm = nn.Linear(8, 16), nn.Linear(16, 8), nn.LayerNorm(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(x + self.down(torch.relu(self.up(x))))

    assert [layer.name for layer in attach(Block(), movement()).layers] == ["up", "down"]


def test_layers_that_cannot_be_pruned_are_named_when_nothing_matches():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with pytest.raises(TargetingError, match=r"(?s)2 torch\.nn\.modules\.conv\.Conv2d.*'0'.*"
                                             r"Conv1D"):
        attach(model, movement())
    assert get_pruner(model) is None


# -- optimizers ------------------------------------------------------------------------------

def test_adafactor_with_relative_step_honours_score_lr():
    from transformers.optimization import Adafactor

    def score_change(score_lr: float) -> float:
        model = MLP()
        base = Adafactor(model.parameters(), lr=None, relative_step=True, scale_parameter=True,
                         warmup_init=True)
        opt = PruningOptimizer(base, movement(score_lr=score_lr, initial_remaining=0.5),
                               model=model)
        before = model.fc1.pruning_scores.detach().clone()
        x, y = mlp_batch()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return float((model.fc1.pruning_scores.detach() - before).abs().sum())

    small, large = score_change(1e-3), score_change(4e-3)
    assert small > 0 and large == pytest.approx(4 * small, rel=1e-4)


def test_an_optimizer_built_after_attaching_works():
    model = tiny_bert()
    policy = movement()
    attach(model, policy)  # like get_peft_model: attach first, then build the optimizer
    base = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    opt = PruningOptimizer(base, policy, model=model)
    scores = {id(s) for s in opt.pruner.scores}
    assert not any(id(p) in scores for p in base.param_groups[0]["params"])
    group = opt.score_group()
    assert group["lr"] == policy.score_lr and group["weight_decay"] == 0.0
    assert {id(p) for p in group["params"]} == scores
    for i in range(8):
        bert_step(model, opt, i)
    assert sparsity_report(model).remaining == pytest.approx(0.25, abs=1e-3)


def test_scores_in_a_group_of_their_own_keep_the_users_settings():
    model = MLP()
    pruner = attach(model, movement())
    weights = [p for n, p in model.named_parameters() if not n.endswith(SCORES_NAME)]
    base = torch.optim.SGD([{"params": weights}, {"params": pruner.scores, "lr": 0.5}], lr=0.1)
    opt = PruningOptimizer(base, movement(), model=model)
    assert len(base.param_groups) == 2 and opt.score_group() is base.param_groups[1]
    assert opt.score_group()["lr"] == 0.5


# -- evaluation ---------------------------------------------------------------------------------

def test_eval_reuses_the_masked_weight_until_weights_or_masks_change(monkeypatch):
    from prune_plugin import hooks

    model = tiny_bert()
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2),
                           movement(initial_remaining=0.5), model=model)
    products = []
    original = hooks.effective_weight
    monkeypatch.setattr(hooks, "effective_weight",
                        lambda w, g: (products.append(1), original(w, g))[1])
    model.eval()
    batch = bert_batch(seed=3)
    with torch.no_grad():
        first = model(**batch).logits
        n = len(products)
        assert n == len(opt.pruner.layers)  # one W * M per layer
        assert torch.equal(model(**batch).logits, first) and len(products) == n  # reused
    model.train()
    bert_step(model, opt, 0)  # weights and masks change
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert len(products) == 2 * n
    expected = model(**batch).logits  # with grad: the masked product, not the cache
    finalize(model)
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, expected, atol=1e-6)
