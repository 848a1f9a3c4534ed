"""Training-loop edges: schedulers that set learning rates absolutely, a second wrapper, LBFGS,
PEFT adapters merged through the masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prune_plugin import AttachError, PruningOptimizer, PruningPolicy, finalize, get_pruner
from tests.models import bert_batch, mlp_batch, tiny_bert

SCORE_LR = 1e-2


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.out = nn.Linear(12, 32), nn.Linear(32, 32), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def movement(**kw) -> PruningPolicy:
    return PruningPolicy(**{"method": "movement", "final_remaining": 0.25, "total_steps": 20,
                            "score_lr": SCORE_LR, **kw})


def loss(model: nn.Module, seed: int) -> torch.Tensor:
    x, y = mlp_batch(seed)
    return nn.functional.cross_entropy(model(x), y)


def score_and_weight_lrs(opt: PruningOptimizer, make_scheduler, steps: int = 12):
    """(score lr, weight lr) that each real update used, read inside the inner step."""
    seen: list[tuple[float, float]] = []
    opt.optimizer.register_step_pre_hook(
        lambda o, a, k: seen.append((opt.score_group()["lr"], o.param_groups[0]["lr"])))
    scheduler = make_scheduler(opt)
    model = opt.pruner.model
    for step in range(steps):
        loss(model, step).backward()
        opt.step()
        opt.zero_grad()
        scheduler.step()
    return seen


class Absolute:
    """A hand-written schedule that writes one absolute lr into every group."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt, self.n = opt, 0

    def step(self) -> None:
        self.n += 1
        for group in self.opt.param_groups:
            group["lr"] = 1e-4 * (1 + self.n % 3)


@pytest.mark.parametrize("kind", ["onecycle", "onecycle-list", "cyclic", "constant-absolute"])
def test_the_scores_lr_keeps_its_ratio_to_the_weights_under_any_scheduler(kind):
    model = MLP()
    base_lr = 1e-3
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=base_lr), movement(),
                           model=model)
    sched = torch.optim.lr_scheduler
    make = {
        # a scalar max_lr sets every group, the scores' included: followed, not obeyed
        "onecycle": lambda o: sched.OneCycleLR(o, max_lr=1e-3, total_steps=12),
        # a list needs one entry per group, the scores' too (its value is replaced)
        "onecycle-list": lambda o: sched.OneCycleLR(o, max_lr=[2e-3, 5.0], total_steps=12),
        "cyclic": lambda o: sched.CyclicLR(o, base_lr=1e-4, max_lr=1e-3, step_size_up=3,
                                           cycle_momentum=False),
        "constant-absolute": Absolute,
    }[kind]
    seen = score_and_weight_lrs(opt, make)
    assert len({round(w, 12) for _, w in seen}) > 1  # the weights' lr was scheduled
    for score_lr, weight_lr in seen:
        assert score_lr == pytest.approx(SCORE_LR * weight_lr / base_lr, rel=1e-9)


def test_a_second_wrapper_on_the_same_model_is_refused_and_close_hands_over():
    model = MLP()
    first = PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), movement(),
                             model=model)
    with pytest.raises(AttachError, match="already driven by a PruningOptimizer"):
        PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), movement(), model=model)
    loss(model, 0).backward()
    first.step()
    assert first.step_count == 1
    first.close()  # e.g. the optimizer is rebuilt after unfreezing layers
    second = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), movement(),
                              model=model)
    assert second.pruner is first.pruner and second.step_count == 1
    with pytest.raises(RuntimeError, match="closed"):
        first.step()
    scores = second.pruner.scores
    assert {id(p) for p in second.score_group()["params"]} == {id(s) for s in scores}
    assert all(id(p) not in {id(s) for s in scores}
               for g in first.optimizer.param_groups for p in g["params"])
    loss(model, 1).backward()
    second.step()
    assert second.step_count == 2  # one step per iteration, never two


def test_lbfgs_is_refused_when_scores_need_a_group_and_works_for_magnitude():
    model = MLP()
    with pytest.raises(AttachError, match="LBFGS takes exactly one param group"):
        PruningOptimizer(torch.optim.LBFGS(model.parameters()), movement(), model=model)
    assert get_pruner(model) is None
    opt = PruningOptimizer(torch.optim.LBFGS(model.parameters(), max_iter=2),
                           PruningPolicy(method="magnitude", final_remaining=0.5, total_steps=2),
                           model=model)

    def closure():
        opt.zero_grad()
        value = loss(model, 0)
        value.backward()
        return value

    opt.step(closure)
    assert opt.step_count == 1


def test_finalize_merges_peft_adapters_through_the_masks():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query", "value"]))
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2),
                           movement(total_steps=8), model=model)
    for i in range(8):
        batch = bert_batch(seed=i)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    lora = model.base_model.model.bert.encoder.layer[0].attention.self.query
    layer = next(x for x in opt.pruner.layers if x.module is lora.base_layer)
    with torch.no_grad():
        expected = (lora.base_layer.weight + lora.get_delta_weight("default")) * layer.gate()
    merged = finalize(model, merge_adapters=True)
    assert get_pruner(merged) is None
    query = merged.bert.encoder.layer[0].attention.self.query
    assert type(query) is nn.Linear
    torch.testing.assert_close(query.weight, expected)
    assert int(torch.count_nonzero(query.weight)) == round(0.25 * query.weight.numel())


def test_a_dropped_wrapper_does_not_block_a_new_one():
    import gc

    model = MLP()
    opt = PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), movement(), model=model)
    loss(model, 0).backward()
    opt.step()
    del opt
    gc.collect()  # e.g. a notebook cell run again
    again = PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), movement(),
                             model=model)
    assert again.step_count == 1
