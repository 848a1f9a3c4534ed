"""Wiring between the parts, against expectations computed independently here: global Top-v
across layers of different sizes, the kept count after every step against Eq. 5, masks fixed
between refreshes, GradScaler's unscaled score step, detach exact after training. Written so
that the small mutations a refactoring could make (a global scope ranked per layer, the
schedule read a step late) fail here."""

from __future__ import annotations

import ast
from pathlib import Path

import copy

import pytest
import torch
from torch import nn

from prune_plugin import PruningOptimizer, PruningPolicy, detach

from .models import MLP, mlp_batch


def eq5(t: int, *, vi: float, vf: float, ti: int, tf: int, total: int) -> float:
    """Eq. 5 (with t - t_i in the numerator, as the paper's code): the fraction kept after
    t steps."""
    if t < ti:
        return vi
    if t >= total - tf:
        return vf
    return vf + (vi - vf) * (1 - (t - ti) / (total - ti - tf)) ** 3


def topv_count(v: float, n: int) -> int:
    return max(1, round(v * n)) if v < 1 else n


def train_step(model: nn.Module, opt: PruningOptimizer, seed: int) -> None:
    x, y = mlp_batch(seed)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each pruned layer's mask (all True where nothing is pruned yet)."""
    from prune_plugin import get_pruner

    out = {}
    for layer in get_pruner(model).layers:
        gate = layer.gate()
        out[layer.name] = torch.ones(layer.shape, dtype=torch.bool) if gate is None \
            else gate.clone()
    return out


def test_global_magnitude_ranks_all_layers_together_not_each_alone():
    """fc1 (288 weights) scaled up 10x: a global Top-v keeps mostly fc1's weights; the masks
    equal an independent ranking of every |W| together (ties by position)."""
    model = MLP()
    with torch.no_grad():
        model.fc1.weight.mul_(10.0)
    p = PruningPolicy(method="magnitude", scope="global", initial_remaining=0.3,
                      final_remaining=0.3, total_steps=1)
    PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), p, model=model)
    layers = [model.fc1, model.fc2]  # the head is excluded
    flat = torch.cat([m.weight.detach().abs().flatten() for m in layers])
    k = topv_count(0.3, flat.numel())
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    expected = torch.zeros_like(flat, dtype=torch.bool)
    expected[order] = True
    got = torch.cat([masks(model)[name].flatten() for name in ("fc1", "fc2")])
    assert torch.equal(got, expected)
    kept_fc1 = int(masks(model)["fc1"].sum())
    assert kept_fc1 > 0.3 * model.fc1.weight.numel() * 2  # local would keep exactly 30% of it


@pytest.mark.parametrize("scope", ["local", "global"])
def test_the_kept_count_after_every_step_follows_eq5(scope):
    ti, tf, total, vf = 2, 3, 12, 0.2
    model = MLP()
    p = PruningPolicy(method="movement", scope=scope, final_remaining=vf, warmup_steps=ti,
                      cooldown_steps=tf, total_steps=total)
    opt = PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), p, model=model)
    sizes = {"fc1": 288, "fc2": 384}
    for t in range(1, total + 1):
        train_step(model, opt, t)
        v = eq5(t, vi=1.0, vf=vf, ti=ti, tf=tf, total=total)
        kept = {name: int(m.sum()) for name, m in masks(model).items()}
        if scope == "local":
            assert kept == {n: topv_count(v, s) for n, s in sizes.items()}, f"step {t}"
        else:
            assert sum(kept.values()) == topv_count(v, sum(sizes.values())), f"step {t}"


def test_masks_stay_fixed_between_refreshes():
    every = 3
    model = MLP()
    p = PruningPolicy(method="movement", final_remaining=0.2, warmup_steps=0, cooldown_steps=3,
                      total_steps=12, mask_update_every=every)
    opt = PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), p, model=model)
    previous = masks(model)
    changed_at = []
    for t in range(1, 13):
        train_step(model, opt, t)
        now = masks(model)
        if any(not torch.equal(now[n], previous[n]) for n in now):
            changed_at.append(t)
        previous = now
    assert changed_at and all(t % every == 0 for t in changed_at)


def test_grad_scaler_gives_the_scores_the_unscaled_step():
    """The same step with and without a GradScaler (scale 1024) moves the scores alike."""
    def run(scaled: bool) -> torch.Tensor:
        model = MLP()
        opt = PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                               PruningPolicy(method="movement", final_remaining=0.3,
                                             total_steps=12), model=model)
        before = model.fc1.pruning_scores.detach().clone()
        x, y = mlp_batch()
        loss = nn.functional.cross_entropy(model(x), y)
        if scaled:
            scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        assert opt.step_count == 1
        return model.fc1.pruning_scores.detach() - before

    plain, scaled = run(False), run(True)
    assert plain.abs().max() > 0
    torch.testing.assert_close(scaled, plain, rtol=1e-5, atol=1e-8)


def test_detach_after_training_is_exact():
    """After real steps, detach leaves the plain module: the same parameter objects and keys
    as before attaching, no forward override or hooks, and the outputs of a plain copy holding
    the same (trained, unmasked) weights."""
    model = MLP()
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2),
                           PruningPolicy(method="movement", final_remaining=0.3, warmup_steps=1,
                                         cooldown_steps=1, total_steps=6), model=model)
    for t in range(4):
        train_step(model, opt, t)
    detach(model)
    assert list(model.state_dict()) == keys_before
    assert {n: p for n, p in model.named_parameters()} == params_before
    for m in model.modules():
        assert "forward" not in m.__dict__
        assert not m._forward_pre_hooks and not m._forward_hooks
        assert not m._state_dict_hooks and not m._load_state_dict_pre_hooks
    plain = MLP()
    plain.load_state_dict(copy.deepcopy(model.state_dict()))
    x, _ = mlp_batch(99)
    assert torch.equal(model(x), plain(x))


# -- the core's modules point down ------------------------------------------------------------

#: The core's modules from the bottom up: each imports (at run time) only modules before it.
#: Imports under ``if TYPE_CHECKING:`` are annotations only, and may name any module.
LAYERS = ["errors", "storage", "policy", "schedule", "selection", "masks", "distributed",
          "methods", "targeting", "families", "structure", "hooks", "pruner", "optimizer",
          "state", "report", "compress", "cli"]


def _runtime_imports(tree: ast.AST) -> set[str]:
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.dump(node.test) for n in ast.walk(node)}
    return {node.module.split(".")[1] for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and id(node) not in typing_only
            and node.module and node.module.startswith("prune_plugin.")
            and not node.module.startswith("prune_plugin.integrations")}


def test_the_core_imports_point_down():
    root = Path(__file__).resolve().parents[1] / "prune_plugin"
    modules = {p.stem for p in root.glob("*.py")} - {"__init__", "__main__"}
    assert modules == set(LAYERS), "list a new core module in LAYERS, at its level"
    for name in LAYERS:
        imported = _runtime_imports(ast.parse((root / f"{name}.py").read_text()))
        above = imported - set(LAYERS[:LAYERS.index(name)])
        assert not above, f"prune_plugin/{name}.py imports {sorted(above)}, above it"


def test_the_layer_check_sees_an_import_upwards():
    tree = ast.parse("from prune_plugin.pruner import Pruner\n"
                     "if TYPE_CHECKING:\n    from prune_plugin.cli import main\n")
    assert _runtime_imports(tree) == {"pruner"}
