import json

import pytest
import torch
from torch import nn

from prune_plugin import (PolicyError, PruningOptimizer, PruningPolicy, StateError,
                          load_pruning_state, save_pruning_state)
from prune_plugin.state import read_pruning_state, read_safetensors, write_safetensors

from .models import MLP, mlp_batch


def trained(policy: PruningPolicy, steps: int = 4, seed: int = 0):
    model = MLP(seed)
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), policy, model=model)
    for i in range(steps):
        x, y = mlp_batch(seed=i)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


POLICY = PruningPolicy(method="movement", final_remaining=0.3, total_steps=6)


def test_round_trip_restores_step_scores_and_masks(tmp_path):
    model, opt = trained(POLICY)
    path = save_pruning_state(opt, tmp_path / "pruning_state.safetensors")
    fresh, fresh_opt = trained(POLICY, steps=0, seed=1)
    load_pruning_state(fresh_opt, path)
    assert fresh_opt.step_count == 4
    for a, b in zip(opt.pruner.layers, fresh_opt.pruner.layers):
        assert torch.equal(a.scores, b.scores) and torch.equal(a.mask, b.mask)


def test_file_is_readable_by_the_safetensors_library(tmp_path):
    import safetensors
    from safetensors.torch import load_file

    model, opt = trained(POLICY)
    path = save_pruning_state(opt, tmp_path / "s.safetensors")
    loaded = load_file(str(path))
    assert set(loaded) == {"fc1.scores", "fc2.scores", "fc1.mask", "fc2.mask"}
    assert torch.equal(loaded["fc1.scores"], model.fc1.pruning_scores.detach())
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert PruningPolicy.model_validate_json(meta["policy"]) == POLICY and meta["step"] == "4"


def test_writer_round_trips_all_dtypes(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(),
               "bool": torch.rand(2, 3) > 0.5, "i64": torch.arange(4), "empty": torch.zeros(0, 3)}
    write_safetensors(tmp_path / "t.safetensors", tensors, {"k": "v"})
    back, meta = read_safetensors(tmp_path / "t.safetensors")
    assert meta == {"k": "v"}
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t)


def test_refuses_another_policy_and_changes_nothing(tmp_path):
    _, opt = trained(POLICY)
    path = save_pruning_state(opt, tmp_path / "s.safetensors")
    other_policy = PruningPolicy(method="movement", final_remaining=0.5, total_steps=6)
    model, other = trained(other_policy, steps=1)
    before = model.fc1.pruning_scores.clone()
    with pytest.raises(StateError, match="another policy.*final_remaining"):
        load_pruning_state(other, path)
    assert torch.equal(model.fc1.pruning_scores, before) and other.step_count == 1


@pytest.mark.parametrize("fields,before", [
    (dict(method="l0", final_remaining=0.1),
     dict(score_init_offset=0.0, l0_gate_gradient="clamped")),
    (dict(method="soft_movement", final_remaining=0.1, total_steps=2000),
     dict(remaining_control="topv"))])
def test_a_policy_saved_before_a_field_existed_keeps_its_behaviour(fields, before):
    # a run saved by a version without these fields ran with `before`; absent from its saved
    # policy, they read as that, so resuming under today's other default is refused (with the
    # fix), not silently changed
    from prune_plugin.pruner import check_saved_policy

    fields = {"total_steps": 10, **fields}
    old = PruningPolicy(**fields, **before)
    saved = {k: v for k, v in json.loads(old.to_json()).items() if k not in before}
    assert PruningPolicy.from_saved_json(json.dumps(saved)) == old
    current = PruningPolicy(**fields)
    assert all(getattr(current, f) != v for f, v in before.items())  # a changed default
    with pytest.raises(StateError, match=f"another policy.*{next(iter(before))}.*Fix: attach "
                                         "with the saved policy"):
        check_saved_policy(json.dumps(saved), current)
    check_saved_policy(json.dumps(saved), old)  # the saved run's own policy resumes
    check_saved_policy(current.to_json(), current)
    with pytest.raises(PolicyError, match="invalid pruning policy"):
        PruningPolicy.from_saved_json(current.to_json()[:-3])  # cut short


@pytest.mark.parametrize("method", [["movement"], {"a": 1}, 3, None])
def test_a_saved_policy_whose_method_is_not_a_name_is_a_policy_error(method):
    # (the migration looked the method up in a dict: a list was a raw TypeError)
    with pytest.raises(PolicyError, match="method: "):
        PruningPolicy.from_saved_json(json.dumps({"method": method, "total_steps": 3}))


def test_refuses_another_shape_and_changes_nothing(tmp_path):
    _, opt = trained(POLICY)
    path = save_pruning_state(opt, tmp_path / "s.safetensors")
    model, other = trained(POLICY, steps=1)
    model.fc2.pruning_scores.data = torch.zeros(16, 24)
    wide = nn.Linear(12, 30)
    model.fc1.weight = wide.weight
    with pytest.raises(StateError, match=r"saved scores of .fc1. have shape \(24, 12\), this run.s \(30, 12\)"):
        load_pruning_state(other, path)
    assert other.step_count == 1


def test_refuses_files_that_are_not_pruning_state(tmp_path):
    _, opt = trained(POLICY)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(StateError, match="not a readable safetensors file"):
        load_pruning_state(opt, junk)
    write_safetensors(tmp_path / "plain.safetensors", {"x": torch.zeros(2)})
    with pytest.raises(StateError, match="not a prune_plugin state file"):
        read_pruning_state(tmp_path / "plain.safetensors")
    with pytest.raises(StateError, match="no prune_plugin state file at"):
        load_pruning_state(opt, tmp_path / "missing.safetensors")


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "s.safetensors"
    write_safetensors(path, {"a": torch.ones(2)})
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_safetensors(path, {"a": torch.zeros(2)})
    assert torch.equal(read_safetensors(path)[0]["a"], torch.ones(2))
