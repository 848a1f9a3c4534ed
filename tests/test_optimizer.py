import copy

import pytest
import torch
from torch import nn

from prune_plugin import PruningOptimizer, PruningPolicy, StateError, detach, sparsity_report
from prune_plugin.optimizer import SCORE_GROUP_TAG

from .models import MLP, bert_batch, mlp_batch, tiny_bert


def movement(**kw) -> PruningPolicy:
    base = dict(method="movement", final_remaining=0.3, warmup_steps=2, cooldown_steps=2,
                total_steps=12)
    return PruningPolicy(**{**base, **kw})


def train_mlp(opt, model, steps, start=0, accumulate=1):
    for i in range(start, start + steps):
        for j in range(accumulate):
            x, y = mlp_batch(seed=100 * i + j)
            (nn.functional.cross_entropy(model(x), y) / accumulate).backward()
        opt.step()
        opt.zero_grad()


def test_is_an_optimizer_and_delegates():
    model = MLP()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    opt = PruningOptimizer(inner, movement(), model=model)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    assert opt.defaults is inner.defaults
    group = opt.score_group()
    assert group[SCORE_GROUP_TAG] == "scores" and group["lr"] == 1e-2 and group["weight_decay"] == 0
    assert {id(p) for p in group["params"]} == {id(model.fc1.pruning_scores), id(model.fc2.pruning_scores)}
    new_groups = [dict(g) for g in inner.param_groups]
    opt.param_groups = new_groups  # ZeRO 1/2 swap param_groups temporarily
    assert inner.param_groups is new_groups


def test_step_trains_weights_and_scores_and_prunes_on_schedule():
    model = MLP()
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), movement(), model=model)
    w0, s0 = model.fc1.weight.clone(), model.fc1.pruning_scores.clone()
    remaining = []
    for i in range(12):
        train_mlp(opt, model, 1, start=i)
        remaining.append(sparsity_report(model).remaining)
    assert not torch.equal(model.fc1.weight, w0) and not torch.equal(model.fc1.pruning_scores, s0)
    assert remaining[0] == 1.0 and remaining[-1] == pytest.approx(0.3, abs=1e-3)
    assert all(a >= b for a, b in zip(remaining, remaining[1:]))
    assert opt.step_count == 12


def test_scores_follow_eq4_under_sgd():
    # With plain SGD, S accumulates -lr * sum_t dL/dW' * W (Eq. 4), masked or not, from
    # wherever it started (the paper: 0; our movement default: the normalised |W|).
    for init in ("constant", "magnitude"):
        model = MLP()
        policy = movement(score_lr=0.5, final_remaining=0.5, warmup_steps=0, score_init=init)
        opt = PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), policy, model=model)
        s0 = model.fc1.pruning_scores.detach().clone()
        assert (s0 == 0).all() == (init == "constant")
        x, y = mlp_batch()
        nn.functional.cross_entropy(model(x), y).backward()
        g_scores = model.fc1.pruning_scores.grad.clone()
        opt.step()
        assert g_scores.abs().sum() > 0
        assert torch.allclose(model.fc1.pruning_scores, s0 - 0.5 * g_scores)


def test_lr_scheduler_grad_clipping_and_accumulation_work_unchanged():
    model = MLP()
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), movement(), model=model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for i in range(4):
        for j in range(2):
            x, y = mlp_batch(seed=10 * i + j)
            (nn.functional.cross_entropy(model(x), y) / 2).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    assert opt.step_count == 4
    assert opt.score_group()["lr"] == pytest.approx(1e-2 / 5)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 5)


def test_grad_scaler_steps_through_the_wrapper():
    model = MLP()
    opt = PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), movement(), model=model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = mlp_batch()
    before = model.fc1.pruning_scores.clone()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.step_count == 1 and not torch.equal(before, model.fc1.pruning_scores)
    # the score step used unscaled gradients: |delta| = score_lr * |grad| is small
    assert (model.fc1.pruning_scores - before).abs().max() < 1.0


def test_closure_is_supported():
    model = MLP()
    opt = PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), movement(), model=model)
    x, y = mlp_batch()

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and opt.step_count == 1


@pytest.mark.parametrize("method", ["soft_movement", "l0"])
def test_regularizer_reaches_score_gradients_without_changing_the_loss(method):
    model = MLP()
    policy = PruningPolicy(method=method, total_steps=4, final_lambda=50.0)
    opt = PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), policy, model=model)
    opt.pruner.step_count = 4  # lambda at its final value
    x, y = mlp_batch()
    nn.functional.cross_entropy(model(x), y).backward()
    task_grad = model.fc1.pruning_scores.grad.clone()
    scores = [model.fc1.pruning_scores, model.fc2.pruning_scores]
    n = sum(s.numel() for s in scores)
    with torch.enable_grad():
        s = model.fc1.pruning_scores.detach().clone().requires_grad_(True)
        z = s if method == "soft_movement" else s - 2 / 3 * torch.log(torch.tensor(0.1 / 1.1))
        (penalty_grad,) = torch.autograd.grad(50.0 * torch.sigmoid(z).sum() / n, (s,))
    opt.add_penalty_grads()
    assert torch.allclose(model.fc1.pruning_scores.grad, task_grad + penalty_grad)


def test_soft_movement_prunes_through_the_regularizer():
    model = MLP()
    policy = PruningPolicy(method="soft_movement", total_steps=60, final_lambda=3000.0,
                           score_lr=0.1)
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), policy, model=model)
    train_mlp(opt, model, 60)
    assert sparsity_report(model).remaining < 0.9


def test_wrapping_twice_or_non_optimizers_is_refused():
    model = MLP()
    opt = PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), movement(), model=model)
    with pytest.raises(TypeError, match="already a PruningOptimizer"):
        PruningOptimizer(opt, movement(), model=model)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        PruningOptimizer(object(), movement(), model=MLP())  # type: ignore[arg-type]


def test_optimizer_holding_scores_already_is_refused_and_rolled_back():
    from prune_plugin import AttachError, attach, get_pruner

    model = MLP()
    pruner = attach(model, movement(final_remaining=0.5, total_steps=20))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # includes the scores
    with pytest.raises(AttachError, match="already attached with another policy"):
        PruningOptimizer(opt, movement(final_remaining=0.3, total_steps=20), model=model)
    assert get_pruner(model) is pruner and len(opt.param_groups) == 1  # nothing touched


def test_step_after_detach_is_refused_and_scores_leave_the_optimizer():
    model = MLP()
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters()), movement(), model=model)
    train_mlp(opt, model, 1)
    detach(model)
    assert opt.score_group() is None and len(opt.optimizer.state) == 6
    with pytest.raises(RuntimeError, match="detached or finalized"):
        opt.step()


@pytest.mark.parametrize("method,kw", [
    ("movement", dict(scope="global", final_remaining=0.3, mask_update_every=5)),
    ("movement", dict(scope="local", final_remaining=0.3)),
    ("magnitude", dict(final_remaining=0.3, mask_update_every=2)),
    ("soft_movement", dict(final_lambda=2000.0, score_lr=0.1)),
    ("l0", dict(final_lambda=200.0)),
    ("l0", dict(final_lambda=20.0, final_remaining=0.3)),
])
def test_resume_mid_run_is_bit_identical(method, kw):
    policy = PruningPolicy(method=method, warmup_steps=1, cooldown_steps=2, total_steps=10, **kw)

    def run(steps_before_save, resume):
        torch.manual_seed(0)
        model = tiny_bert()
        opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), policy, model=model)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 20)

        def steps(a, b):
            for i in range(a, b):
                torch.manual_seed(1000 + i)  # L0 samples its gates from the global RNG
                model(**bert_batch(seed=i)).loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad()

        steps(0, steps_before_save)
        if resume:
            saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
            torch.manual_seed(0)
            model = tiny_bert(seed=123)  # different init, overwritten by the checkpoint
            opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), policy,
                                   model=model)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 20)
            model.load_state_dict(saved[0])
            opt.load_state_dict(saved[1])
            sched.load_state_dict(saved[2])
        steps(steps_before_save, 10)
        masks = [layer.gate() for layer in opt.pruner.layers]
        return model.state_dict(), masks

    full_state, full_masks = run(10, resume=False)
    resumed_state, resumed_masks = run(5, resume=True)
    for k in full_state:
        assert torch.equal(full_state[k], resumed_state[k]), k
    for a, b in zip(full_masks, resumed_masks):
        assert (a is None and b is None) or torch.equal(a, b)


def test_load_state_dict_refuses_mismatches_and_changes_nothing():
    model = MLP()
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters()), movement(), model=model)
    train_mlp(opt, model, 3)
    good = opt.state_dict()
    other = MLP()
    opt2 = PruningOptimizer(torch.optim.AdamW(other.parameters()), movement(final_remaining=0.2),
                            model=other)
    scores_before = other.fc1.pruning_scores.clone()
    with pytest.raises(StateError, match=r"another policy \(final_remaining: saved 0.3 vs current 0.2"):
        opt2.load_state_dict(good)
    with pytest.raises(StateError, match="not a PruningOptimizer state dict"):
        opt2.load_state_dict(opt.optimizer.state_dict())
    bad_version = copy.deepcopy(good)
    bad_version["pruning"]["format_version"] = 99
    with pytest.raises(StateError, match="format_version 99"):
        opt.load_state_dict(bad_version)
    assert torch.equal(other.fc1.pruning_scores, scores_before) and opt2.step_count == 0
    assert len(opt2.optimizer.state) == 0
