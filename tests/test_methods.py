"""The method strategies: one per method of the paper, and the requested-sparsity mode of
soft movement and L0 (beyond the paper: no lambda calibration)."""

from __future__ import annotations

import pytest
import torch

from prune_plugin import PolicyError, PruningOptimizer, PruningPolicy, sparsity_report
from prune_plugin.methods import (HardConcreteGate, MaskGate, Threshold, ThresholdOverTopV, TopV,
                                  method_for)

from .models import bert_batch, tiny_bert


@pytest.mark.parametrize("fields,parts", [
    # (selector, its scope, gate, straight-through or masked gate, penalty, its controller)
    (dict(method="magnitude"), (TopV, "local", MaskGate, False, False, False)),
    (dict(method="movement"), (TopV, "local", MaskGate, True, False, False)),
    (dict(method="movement", scope="global"), (TopV, "global", MaskGate, True, False, False)),
    (dict(method="soft_movement"), (Threshold, None, MaskGate, True, True, False)),
    (dict(method="l0"), (None, None, HardConcreteGate, False, True, False)),
    (dict(method="soft_movement", final_remaining=0.2, remaining_control="lambda"),
     (ThresholdOverTopV, "global", MaskGate, True, True, True)),
    (dict(method="soft_movement", final_remaining=0.2, remaining_control="topv"),
     (TopV, "global", MaskGate, True, True, False)),
    (dict(method="l0", final_remaining=0.2), (TopV, "global", HardConcreteGate, True, True,
                                               True))])
def test_each_policy_gets_its_parts(fields, parts):
    method = method_for(PruningPolicy(total_steps=10, **fields))
    selector, scope, gate, flag, penalized, controlled = parts
    assert type(method.selector) is type(None) if selector is None else selector
    topv = getattr(method.selector, "topv", method.selector)
    assert getattr(topv, "scope", None) == scope
    assert type(method.gate) is gate
    assert (method.gate.straight_through if gate is MaskGate else method.gate.masked) == flag
    assert (method.penalty is not None) == penalized
    assert (method.penalty is not None and method.penalty.controller is not None) == controlled
    assert method.has_scores == (fields["method"] != "magnitude")


def test_the_requested_sparsity_mode_validates():
    with pytest.raises(PolicyError, match="final_threshold and final_remaining exclude each other"):
        PruningPolicy(method="soft_movement", final_remaining=0.1, final_threshold=0.2,
                      remaining_control="topv", total_steps=10)
    with pytest.raises(PolicyError,
                       match="initial_remaining .* applies to l0 only with final_remaining"):
        PruningPolicy(method="l0", initial_remaining=0.5, total_steps=10)
    for control in ("lambda", "topv"):
        policy = PruningPolicy(method="soft_movement", final_remaining=0.1, total_steps=10,
                               remaining_control=control)
        assert PruningPolicy.model_validate_json(policy.to_json()) == policy
    paper = PruningPolicy(method="soft_movement", total_steps=10)  # lambda sets the sparsity
    assert paper.final_remaining is None and not paper.targets_remaining
    assert PruningPolicy.model_validate_json(paper.to_json()) == paper


@pytest.mark.parametrize("method,control", [("soft_movement", "lambda"),
                                            ("soft_movement", "topv"), ("l0", None)])
def test_soft_movement_and_l0_reach_the_requested_remaining_fraction(method, control):
    extra = {} if control is None else {"remaining_control": control}
    policy = PruningPolicy(method=method, final_remaining=0.15, warmup_steps=2,
                           cooldown_steps=3, total_steps=12, final_lambda=50.0, **extra)
    model = tiny_bert()
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), policy, model=model)
    remaining = []
    for step in range(12):
        model(**bert_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
        remaining.append(sparsity_report(model).remaining)
    assert remaining[0] == 1.0 and all(a >= b - 1e-9 for a, b in zip(remaining, remaining[1:]))
    report = sparsity_report(model)
    # a global Top-v: exactly round(v * n) (L0: every gate of the Top-v open, by the projection)
    assert report.kept == round(0.15 * report.total)


@pytest.mark.parametrize("final_lambda", [50.0, 5000.0])
def test_l0_at_a_requested_fraction_follows_the_schedule_whatever_lambda(final_lambda):
    # A fixed lambda closed gates the Top-v kept (3.5% left at a requested 10%): the controller
    # switches the penalty off at or below v(t), and the cool-down's projection reopens the
    # Top-v's closed gates, so the run ends at exactly v_f.
    policy = PruningPolicy(method="l0", final_remaining=0.15, warmup_steps=2, cooldown_steps=3,
                           total_steps=14, final_lambda=final_lambda, score_lr=0.5)
    model = tiny_bert()
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), policy, model=model)
    pruner = opt.pruner
    lambdas, below = [], []
    for step in range(14):
        model(**bert_batch(seed=step)).loss.backward()
        lambdas.append(pruner.penalty_lambda)
        opt.step()
        opt.zero_grad()
        target = pruner.target
        below.append(sparsity_report(model).remaining < target - 0.05)
    assert lambdas[0] == 0.0  # warm-up: nothing is pruned yet, the penalty is off
    assert max(lambdas) > 0.0  # and it shapes the scores once gates are above v(t)
    assert all(lam <= final_lambda for lam in lambdas)
    if final_lambda == 50.0:
        assert not any(below)
    report = sparsity_report(model)
    assert report.kept == round(0.15 * report.total)
    assert all(bool((layer.gate()[layer.mask] >= 0.1 - 1e-6).all()) for layer in pruner.layers)
    # the floor is in the gate, not in the scores: a kept weight whose log-alpha is below the
    # edge of closed has its gate held at 0.1 in the cool-down (closed before it)
    layer = pruner.layers[0]
    i = int(layer.mask.reshape(-1).nonzero()[0])
    with torch.no_grad():
        layer.scores.view(-1)[i] = pruner.method.gate.log_alpha_at(0.0) - 1.0
    assert float(layer.gate().view(-1)[i]) == pytest.approx(0.1, abs=1e-5)
    assert sparsity_report(model).kept == round(0.15 * report.total)
    pruner.step_count = 8  # before the cool-down
    assert float(layer.gate().view(-1)[i]) == 0.0


def test_the_l0_controller_scales_the_penalty_the_optimizer_adds():
    policy = PruningPolicy(method="l0", final_remaining=0.15, warmup_steps=2, cooldown_steps=3,
                           total_steps=14, final_lambda=50.0)
    model = tiny_bert()
    opt = PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), policy, model=model)
    for p in opt.pruner.scores:
        p.grad = None
    opt.add_penalty_grads()  # warm-up: every gate is open, but nothing is pruned yet
    assert all(p.grad is None or not bool(p.grad.any()) for p in opt.pruner.scores)
    opt.pruner.step_count = 5  # pruning: v(t) < 1 and ~all gates open, so full lambda
    assert opt.pruner.target < 0.8
    opt.add_penalty_grads()
    assert all(bool(p.grad.abs().sum() > 0) for p in opt.pruner.scores)


def test_l0_gates_outside_the_requested_top_v_are_closed_in_training_too():
    policy = PruningPolicy(method="l0", final_remaining=0.3, initial_remaining=0.3,
                           total_steps=4, score_init="uniform", score_init_value=3.0)
    model = tiny_bert()  # (equal scores would tie: the first layers would be kept whole)
    opt = PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), policy, model=model)
    layer = opt.pruner.layers[0]
    closed = ~layer.mask
    assert 0 < int(closed.sum()) < closed.numel()
    x = torch.randn(5, layer.weight.shape[1], generator=torch.Generator().manual_seed(0))
    model.train()
    torch.manual_seed(1)
    out = layer.module(x)  # sampled gates (the same noise below), times the Top-v mask
    out.sum().backward()
    assert torch.all(layer.scores.grad[closed] == 0) and torch.any(layer.scores.grad[~closed] != 0)
    with torch.no_grad():
        layer.weight[closed] = 1e6  # weights behind closed gates must not matter
        torch.manual_seed(1)
        assert torch.equal(layer.module(x), out.detach())


@pytest.mark.parametrize("gradient", ["clamped", "straight_through"])
def test_l0_gates_started_open_learn_only_straight_through(gradient):
    # score_init_offset lifts L0's |W|-ranked log-alpha so every gate starts open (the weights
    # as pretrained); a sampled gate clamped at 1 passes its score no gradient unless
    # l0_gate_gradient is straight_through
    from prune_plugin import attach

    model = tiny_bert()
    pruner = attach(model, PruningPolicy(method="l0", final_remaining=0.2, total_steps=10,
                                         score_init_offset=6.0, l0_gate_gradient=gradient))
    for layer, scores in zip(pruner.layers, pruner.scores):
        magnitude = layer.module.weight.detach().abs()
        assert torch.allclose(scores.detach(), magnitude / magnitude.mean() + 6.0)
    model.train()
    model(**bert_batch(seed=0)).loss.backward()
    grads = [s.grad for s in pruner.scores]
    moved = sum(int(torch.count_nonzero(g)) for g in grads if g is not None)
    if gradient == "clamped":  # log-alpha >= 6: (nearly) every sampled gate is clamped at 1
        assert moved <= 0.01 * sum(s.numel() for s in pruner.scores)
    else:  # (all but the few whose sigmoid saturates in float32)
        assert moved >= 0.9 * sum(s.numel() for s in pruner.scores)


@pytest.mark.parametrize("structure", ["unstructured", "hybrid"])
@pytest.mark.parametrize("warmup_gates", ["sampled", "open"])
def test_l0_open_warmup_trains_the_dense_model_while_the_scores_learn(warmup_gates, structure):
    # l0_warmup_gates: open -- the warm-up's training forwards are the dense model's (gates of
    # 1), its scores still get the sampled gates' gradient; from the warm-up's end the gates
    # are sampled. (score_init_offset 0: sampled gates are far from 1, so the two differ.)
    model = tiny_bert()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = bert_batch(seed=0)
    model.train()
    with torch.no_grad():
        dense = model(**batch).logits
    policy = PruningPolicy(method="l0", final_remaining=0.5, total_steps=6, warmup_steps=2,
                           cooldown_steps=1, score_init_offset=0.0, structure=structure,
                           l0_warmup_gates=warmup_gates)
    # lr 0: the weights stay as they are, only the scores move
    opt = PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), policy, model=model)
    for step in range(3):
        with torch.no_grad():
            unrecorded = model(**batch).logits
            model.eval()  # evaluation gates: 1 too, the model that trains
            evaluated = model(**batch).logits
            model.train()
        out = model(**batch)
        out.loss.backward()
        in_warmup = step < 2
        same = torch.allclose(out.logits, dense, atol=1e-6)
        assert same == (in_warmup and warmup_gates == "open")
        assert torch.allclose(unrecorded, dense, atol=1e-6) == same
        assert torch.allclose(evaluated, dense, atol=1e-6) == same
        grads = [s.grad for s in opt.pruner.scores]
        assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)
        opt.step()
        opt.zero_grad()


def test_movement_starts_from_the_magnitude_masks_by_default_and_the_paper_is_one_field_away():
    # Issue 13: the default scores are |W| / mean |W| per layer, so the first local masks are
    # the magnitude masks (global ones rank |W| relative to each layer's mean); score_init:
    # constant gives the paper's zero scores.
    from prune_plugin import attach, detach

    masks = {}
    for method in ("magnitude", "movement"):
        model = tiny_bert()
        pruner = attach(model, PruningPolicy(method=method, total_steps=10,
                                             initial_remaining=0.3, final_remaining=0.3))
        masks[method] = [layer.gate().clone() for layer in pruner.layers]
        detach(model)
    assert all(0 < int(m.sum()) < m.numel() for m in masks["magnitude"])
    assert all(torch.equal(a, b) for a, b in zip(masks["magnitude"], masks["movement"]))
    default = PruningPolicy(method="movement", total_steps=10)
    assert (default.score_init, default.score_init_value) == ("magnitude", 1.0)
    paper = PruningPolicy(method="movement", score_init="constant", total_steps=10)
    assert paper.score_init_value == 0.0
    model = tiny_bert()
    pruner = attach(model, paper)
    assert all(torch.count_nonzero(s) == 0 for s in pruner.scores)
    explicit = PruningPolicy(method="movement", score_init="magnitude", score_init_value=0.3,
                             total_steps=10)
    assert explicit.score_init_value == 0.3
    # soft movement: the paper's mode and the requested fraction's default (lambda control)
    # keep zero scores; the requested fraction as a Top-v of the scores (like hard movement)
    # starts from |W| too
    soft = PruningPolicy(method="soft_movement", total_steps=10)
    assert (soft.score_init, soft.score_init_value) == ("constant", 0.0)
    target = PruningPolicy(method="soft_movement", final_remaining=0.1, total_steps=1000)
    assert (target.remaining_control, target.score_init, target.score_init_value,
            target.final_lambda) == ("lambda", "constant", 0.0, 3000.0)
    topv = PruningPolicy(method="soft_movement", final_remaining=0.1, remaining_control="topv",
                         total_steps=10)
    assert (topv.score_init, topv.score_init_value, topv.final_lambda) == (
        "magnitude", 1.0, 400.0)
    # L0 likewise: the paper's mode keeps its constant log-alpha 2.197 (gates ~90% open) and
    # its clamped gate; the requested-fraction mode ranks by |W| / mean |W| at scale 1 on top
    # of the paper's 2.197, so every gate starts open, and the clamp at 1 passes the scores'
    # gradient (straight-through)
    l0 = PruningPolicy(method="l0", total_steps=10)
    assert (l0.score_init, l0.score_init_value, l0.score_init_offset,
            l0.l0_gate_gradient) == ("constant", 2.197, 0.0, "clamped")
    l0_target = PruningPolicy(method="l0", final_remaining=0.1, total_steps=10)
    assert (l0_target.score_init, l0_target.score_init_value, l0_target.score_init_offset,
            l0_target.l0_gate_gradient) == ("magnitude", 1.0, 2.197, "straight_through")
    model = tiny_bert()
    pruner = attach(model, l0_target)
    assert all(float(s.detach().mean()) == pytest.approx(3.197, rel=1e-4)
               for s in pruner.scores)
    assert all(float(s.detach().min()) >= 2.197 for s in pruner.scores)
    layer = pruner.layers[0]
    assert torch.equal(layer.scores.argsort(), layer.weight.abs().argsort())


def _controlled(**fields) -> PruningPolicy:
    base = dict(method="soft_movement", final_remaining=0.15, remaining_control="lambda",
                warmup_steps=2, cooldown_steps=3, total_steps=16, score_lr=0.5)
    return PruningPolicy(**{**base, **fields})


@pytest.mark.parametrize("fields,control", [
    (dict(total_steps=1000, warmup_steps=100, cooldown_steps=200), "lambda"),  # 700 x 1e-2
    (dict(total_steps=250, warmup_steps=75, cooldown_steps=50), "topv"),  # 125 x 1e-2 < 4.4
    (dict(total_steps=250, warmup_steps=75, cooldown_steps=50, score_lr=0.05), "lambda"),
    (dict(total_steps=1000, score_lr=1e-3), "topv"),  # 1,000 x 1e-3 < 4.4
    (dict(total_steps=250, final_threshold=0.05), "lambda"),  # a threshold asks for one
    (dict(total_steps=250, remaining_control="lambda"), "lambda")])  # the user's choice stands
def test_remaining_control_defaults_to_lambda_where_the_threshold_is_reachable(fields, control):
    policy = PruningPolicy(method="soft_movement", final_remaining=0.1, **fields)
    assert policy.remaining_control == control
    assert type(method_for(policy).selector) is {"lambda": ThresholdOverTopV,
                                                 "topv": TopV}[control]
    # the dump names the mode, so the policy validates back to the same run
    assert PruningPolicy.model_validate_json(policy.to_json()) == policy
    assert policy.model_dump()["remaining_control"] == control


def test_remaining_control_validates_and_round_trips():
    policy = _controlled(final_threshold=0.2)  # the paper's threshold applies to this mode
    assert type(method_for(policy).selector) is ThresholdOverTopV
    assert (policy.score_init, policy.score_init_value) == ("constant", 0.0)  # the paper's
    assert PruningPolicy.model_validate_json(policy.to_json()) == policy
    assert PruningPolicy.model_validate(policy.model_dump()) == policy
    with pytest.raises(PolicyError,
                       match="remaining_control .* only with final_remaining.*none is set"):
        PruningPolicy(method="soft_movement", remaining_control="lambda", total_steps=10)
    with pytest.raises(PolicyError, match="'remaining_control' .* does not apply to method 'l0'"):
        PruningPolicy(method="l0", final_remaining=0.1, remaining_control="lambda",
                      total_steps=10)
    with pytest.raises(PolicyError, match="remaining_control: got 'threshold'"):
        _controlled(remaining_control="threshold")
    with pytest.raises(PolicyError, match="exclude each other with remaining_control 'topv'"):
        _controlled(remaining_control="topv", final_threshold=0.2)


@pytest.mark.parametrize("final_lambda", [50.0, 5000.0])
def test_controlled_soft_movement_follows_the_schedule_from_above_and_ends_exact(final_lambda):
    policy = _controlled(final_lambda=final_lambda)
    model = tiny_bert()
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), policy, model=model)
    pruner, method = opt.pruner, opt.pruner.method
    factors, pruned_by_threshold = [], False
    for step in range(policy.total_steps):
        model(**bert_batch(seed=step)).loss.backward()
        factors.append(float(method.penalty_factor(pruner.candidates(), pruner.step_count)))
        opt.step()
        opt.zero_grad()
        report = sparsity_report(model)
        assert report.kept >= round(pruner.target * report.total)  # never below v(t)
        tau = method.selector.threshold.tau(pruner.step_count)
        if pruner.step_count < method.selector.cooldown_from and tau > 0:
            for layer in pruner.layers:  # the threshold's weights are all kept
                above = layer.scores.detach() > torch.logit(torch.tensor(tau))
                assert bool(layer.gate()[above].all())
                pruned_by_threshold |= bool((~above).any())
    assert pruned_by_threshold  # the threshold did prune, not the Top-v floor alone
    assert max(factors) == 1.0 and min(factors[3:]) == 0.0  # all of lambda, then none
    report = sparsity_report(model)
    assert report.kept == round(0.15 * report.total)  # the cool-down's projection: exact
    kept = torch.cat([layer.gate().reshape(-1) for layer in pruner.layers])
    scores = torch.cat([layer.scores.detach().reshape(-1) for layer in pruner.layers])
    assert scores[kept].min() >= scores[~kept].max()  # a global Top-v of the scores


def test_the_soft_movement_controller_is_a_band_above_the_schedule():
    policy = _controlled(final_lambda=100.0)
    model = tiny_bert()
    opt = PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), policy, model=model)
    pruner, method = opt.pruner, opt.pruner.method
    pruner.step_count = 6
    v, edge = pruner.target, float(torch.logit(torch.tensor(method.selector.threshold.tau(6))))
    band = method.penalty.controller.band
    scores = torch.cat([s.detach().reshape(-1) for s in pruner.scores])
    for share, factor in [(v, 0.0), (v * (1 + band / 2), 0.5), (v * (1 + band), 1.0),
                          (1.0, 1.0)]:
        with torch.no_grad():  # put `share` of the scores above the threshold
            order = torch.randperm(scores.numel(), generator=torch.Generator().manual_seed(0))
            above = torch.zeros(scores.numel(), dtype=torch.bool)
            above[order[:round(share * scores.numel())]] = True
            flat = torch.where(above, edge + 1.0, edge - 1.0)
            for s in pruner.scores:
                s.copy_(flat[:s.numel()].view_as(s))
                flat = flat[s.numel():]
        assert float(method.penalty_factor(pruner.candidates(), 6)) == pytest.approx(factor,
                                                                                    abs=1e-3)


def test_controlled_soft_movement_sharded_masks_equal_the_whole_ones():
    """The ZeRO-3 path (each forward rebuilds the mask from a threshold: here one rank holding
    every score) keeps the same weights as the whole-tensor masks, at every step."""
    from prune_plugin.distributed import Sharding

    class OneRankShards(Sharding):
        shards = True
    runs = []
    for sharded in (False, True):
        model = tiny_bert()
        opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3),
                               _controlled(final_lambda=500.0), model=model)
        if sharded:
            opt.pruner.use_sharding(OneRankShards())
        gates = []
        for step in range(16):
            model(**bert_batch(seed=step)).loss.backward()
            opt.step()
            opt.zero_grad()
            gates.append([torch.ones(layer.shape, dtype=torch.bool) if layer.gate() is None
                          else layer.gate().clone() for layer in opt.pruner.layers])
        assert sharded == all(layer.threshold is not None for layer in opt.pruner.layers)
        runs.append(gates)
    for whole, shard in zip(*runs):
        assert all(torch.equal(a, b) for a, b in zip(whole, shard))


def test_l0_kept_counts_from_thresholds_count_closed_gates_as_the_whole_masks_do():
    """The sharded path's kept counts (a threshold per layer, one rank holding every score
    here) leave out the weights whose L0 gate closed inside the Top-v, as the whole-tensor
    gates do, at every step."""
    from prune_plugin.distributed import Sharding

    class OneRankShards(Sharding):
        shards = True
    policy = PruningPolicy(method="l0", final_remaining=0.3, total_steps=12, warmup_steps=1,
                           cooldown_steps=2, final_lambda=100.0, score_lr=0.1,
                           score_init="constant", score_init_value=-2.0)  # gates near closed
    runs, in_masks = [], []
    for sharded in (False, True):
        model = tiny_bert()
        opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), policy,
                               model=model)
        if sharded:
            opt.pruner.use_sharding(OneRankShards())
        counts = []
        for step in range(12):
            torch.manual_seed(100 + step)  # the sampled gates
            model(**bert_batch(seed=step)).loss.backward()
            opt.step()
            opt.zero_grad()
            counts.append(opt.pruner.kept_counts())
            if not sharded:
                in_masks.append(sum(layer.numel if layer.current_mask() is None
                                    else int(layer.current_mask().sum())
                                    for layer in opt.pruner.layers))
        runs.append(counts)
    assert runs[0] == runs[1]
    assert any(sum(c) < m for c, m in zip(runs[0], in_masks))  # closed gates inside the masks
