import copy

import pytest
import torch
from torch import nn

from prune_plugin import (AttachError, PruningOptimizer, PruningPolicy, TargetingError, attach,
                          detach, finalize, get_pruner)
from prune_plugin.hooks import SCORES_NAME

from .models import MLP, bert_batch, mlp_batch, tiny_bert

METHODS = ["magnitude", "movement", "soft_movement", "l0"]


def policy(method: str, **kw) -> PruningPolicy:
    if method in ("magnitude", "movement"):
        kw.setdefault("initial_remaining", 0.5)
        kw.setdefault("final_remaining", 0.5)
    return PruningPolicy(method=method, total_steps=10, **kw)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", METHODS)
def test_attach_keeps_classes_parameter_identity_and_keys(method):
    model = tiny_bert()
    params = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    pruner = attach(model, policy(method))
    for name, p in params.items():
        assert dict(model.named_parameters())[name] is p
    assert all(type(layer.module) is nn.Linear for layer in pruner.layers)
    new_keys = [k for k in model.state_dict() if k not in keys]
    assert new_keys[-1] == "pruning_step"  # the root's own key comes after its children's
    scores = [k for k in new_keys if k.endswith("." + SCORES_NAME)]
    masks = [k for k in new_keys if k.endswith(".pruning_mask")]
    assert len(scores) == (0 if method == "magnitude" else len(pruner.layers))
    # Top-v keeps 50% from the start; soft movement's tau starts at 0 (all kept), L0 has none
    assert len(masks) == (len(pruner.layers) if method in ("magnitude", "movement") else 0)
    assert len(new_keys) == len(scores) + len(masks) + 1
    assert [k for k in model.state_dict() if k in keys] == keys


@pytest.mark.parametrize("method", METHODS)
def test_detach_restores_the_model_bit_exactly(method):
    model = tiny_bert()
    before = snapshot(model)
    batch = bert_batch()
    model.eval()
    expected = model(**batch).logits
    attach(model, policy(method))
    detach(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(model(**batch).logits, expected)
    for m in model.modules():
        assert "forward" not in m.__dict__ and not m._forward_pre_hooks
        assert not m._state_dict_hooks and not m._load_state_dict_pre_hooks
        assert not m._load_state_dict_post_hooks and SCORES_NAME not in m._parameters
        assert not any(k.startswith("_prune_plugin") for k in m.__dict__)
    assert get_pruner(model) is None


@pytest.mark.parametrize("method", METHODS)
def test_finalize_gives_same_outputs_and_a_plain_model(method):
    model = tiny_bert()
    keys = list(model.state_dict())
    pruner = attach(model, policy(method, **({"score_init": "uniform", "score_init_value": 3.0}
                                                 if method != "magnitude" else {})))
    pruner.step_count = 5
    pruner.refresh()
    model.eval()
    batch = bert_batch()
    expected = model(**batch).logits
    finalize(model)
    assert torch.allclose(model(**batch).logits, expected, atol=1e-6)
    assert list(model.state_dict()) == keys
    for m in model.modules():
        assert "forward" not in m.__dict__ and not m._forward_pre_hooks
    query = model.bert.encoder.layer[0].attention.self.query
    if method in ("magnitude", "movement"):
        assert int(torch.count_nonzero(query.weight)) == query.weight.numel() // 2


def test_masks_change_the_forward():
    model = MLP()
    x, _ = mlp_batch()
    dense = model(x)
    attach(model, policy("magnitude"))
    assert not torch.allclose(model(x), dense)


def test_default_targets_skip_the_head():
    model = tiny_bert()
    names = [layer.name for layer in attach(model, policy("movement")).layers]
    assert len(names) == 12 and all(n.startswith("bert.encoder.") for n in names)
    mlp = MLP()
    assert [layer.name for layer in attach(mlp, policy("movement")).layers] == ["fc1", "fc2"]


def test_targets_and_exclude_select_modules():
    model = tiny_bert()
    layers = attach(model, policy("movement", targets=["attention"], exclude=["output"])).layers
    assert {layer.name.rsplit(".", 1)[1] for layer in layers} == {"query", "key", "value"}


def test_matching_nothing_names_patterns_and_shows_modules():
    model = MLP()
    before = snapshot(model)
    with pytest.raises(TargetingError, match=r"\['decoder'\].*match none.*'fc1', 'fc2', 'head'"):
        attach(model, policy("movement", targets=["decoder"]))
    assert get_pruner(model) is None and list(model.state_dict()) == list(before)


def test_attaching_twice_is_refused_and_changes_nothing():
    model = MLP()
    attach(model, policy("movement"))
    keys = list(model.state_dict())
    with pytest.raises(AttachError, match="already attached"):
        attach(model, policy("magnitude"))
    with pytest.raises(AttachError, match="already attached"):  # found through the wrapper
        attach(nn.Sequential(model), policy("movement"))
    assert list(model.state_dict()) == keys


def test_non_floating_weights_are_refused_with_no_half_attached_model():
    model = MLP()
    model.fc2.weight = nn.Parameter(torch.zeros(16, 24, dtype=torch.int32), requires_grad=False)
    before = snapshot(model)
    with pytest.raises(AttachError, match="'fc2' has a torch.int32 weight"):
        attach(model, policy("movement"))
    assert list(model.state_dict()) == list(before)
    assert "forward" not in model.fc1.__dict__ and not model.fc1._forward_pre_hooks


def test_failure_midway_rolls_back(monkeypatch):
    from prune_plugin import hooks

    model = MLP()
    calls = {"n": 0}
    original = hooks.PrunedLayer.install

    def flaky(self, scores):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        original(self, scores)

    monkeypatch.setattr(hooks.PrunedLayer, "install", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        attach(model, policy("movement"))
    assert SCORES_NAME not in model.fc1._parameters and "forward" not in model.fc1.__dict__
    assert not model.fc1._state_dict_hooks and not model._load_state_dict_post_hooks
    assert get_pruner(model) is None


def test_multihead_attention_out_proj_is_refused_loudly():
    model = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16)
    with pytest.raises(TargetingError, match="out_proj"):
        attach(model, policy("movement"))
    pruner = attach(model, policy("movement", exclude=["out_proj"]))
    assert [layer.name for layer in pruner.layers] == ["linear1", "linear2"]


def test_deepcopy_of_attached_model_is_independent():
    model = MLP()
    attach(model, policy("magnitude"))
    clone = copy.deepcopy(model)
    x, _ = mlp_batch()
    assert torch.equal(clone(x), model(x))
    detach(clone)
    assert get_pruner(model) is not None and "forward" in model.fc1.__dict__


def test_detach_or_finalize_without_pruner_is_refused():
    with pytest.raises(AttachError, match="no pruning attached"):
        detach(MLP())
    with pytest.raises(AttachError, match="no pruning attached"):
        finalize(MLP())


def test_finalize_keeps_weight_identity_for_the_optimizer():
    model = MLP()
    weight = model.fc1.weight
    opt = PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), policy("magnitude"),
                           model=model)
    finalize(model)
    assert model.fc1.weight is weight
    assert any(p is weight for g in opt.optimizer.param_groups for p in g["params"])
