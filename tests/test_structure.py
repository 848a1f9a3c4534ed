"""Structured pruning: heads, FFN neurons and blocks, tied across the modules that share them,
on tiny models of each family; shrinking gives smaller Linears and the same outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prune_plugin import (PolicyError, PruningOptimizer, PruningPolicy, TargetingError, attach,
                          finalize, get_pruner, load_shrunk, sparsity_report)

FAMILIES = ["bert", "roberta", "distilbert", "vit", "llama"]


def tiny(family: str, seed: int = 0) -> nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    if family == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64))
    if family == "roberta":
        return tf.RobertaForSequenceClassification(tf.RobertaConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64))
    if family == "distilbert":
        return tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
            max_position_embeddings=64))
    if family == "vit":
        return tf.ViTForImageClassification(tf.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            image_size=8, patch_size=4, num_labels=2))
    return tf.LlamaForCausalLM(tf.LlamaConfig(  # grouped key/value heads: 4 query, 2 kv
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2))


def inputs(family: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(4, 3, 8, 8, generator=g),
                "labels": torch.randint(0, 2, (4,), generator=g)}
    ids = torch.randint(3, 100, (4, 12), generator=g)
    if family == "llama":
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids, "labels": torch.randint(0, 2, (4,), generator=g)}


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def hybrid(method: str = "movement", **kw) -> PruningPolicy:
    fields = dict(method=method, structure="hybrid", total_steps=6, warmup_steps=1,
                  cooldown_steps=1, score_init="uniform", score_init_value=1.0)
    if method in ("magnitude",):
        fields.pop("score_init"), fields.pop("score_init_value")
    if method in ("magnitude", "movement"):
        fields.setdefault("final_remaining", 0.5)
    return PruningPolicy(**{**fields, **kw})


def train(model, policy, steps=6, family="bert"):
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), policy, model=model)
    model.train()
    for step in range(steps):
        model(**inputs(family, seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_prunes_whole_heads_and_neurons_and_shrinks_exactly(family, tmp_path):
    model = tiny(family)
    opt = train(model, hybrid(), family=family)
    pruner = opt.pruner
    kinds = [g.kind for g in pruner.units]
    assert kinds.count("heads") == 2 and kinds.count("neurons") == 2  # two blocks
    for group in pruner.units:  # local Top-v over units: exactly half of each block's units
        assert int(group.mask.sum()) == group.numel // 2
    scores = sum(s.numel() for s in pruner.scores)
    weights = sum(layer.weight.numel() for layer in pruner.layers)
    assert scores < 0.02 * weights  # one score per unit (BERT-base: 0.02%)
    batch = inputs(family, seed=9)
    masked = logits(model, batch)
    finalize(model, shrink=True)
    assert torch.allclose(logits(model, batch), masked, atol=1e-5)
    sizes = {n: tuple(m.weight.shape) for n, m in model.named_modules()
             if isinstance(m, nn.Linear)}
    assert sum(a * b for a, b in sizes.values()) < sum(
        m.weight.numel() for m in tiny(family).modules() if isinstance(m, nn.Linear)) * 0.65
    model.save_pretrained(tmp_path)
    loaded = load_shrunk(tmp_path, type(model))
    assert torch.allclose(logits(loaded, batch), masked, atol=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "movement", "soft_movement", "soft-target",
                                    "l0", "l0-target"])
def test_every_method_prunes_units_and_finalize_equals_the_masked_model(method):
    kw = {"final_lambda": 200.0, "score_lr": 0.5} if method.startswith(("soft", "l0")) else {}
    if method == "soft_movement":
        kw["final_threshold"] = 0.5
    if method == "soft-target":  # soft movement with a requested fraction (lambda control)
        method, kw = "soft_movement", {**kw, "final_remaining": 0.5, "remaining_control": "lambda"}
    if method == "l0-target":  # L0 with a requested fraction: gates closed outside the Top-v
        # (a weak penalty: the gates stay open, so only the Top-v closes units)
        method, kw = "l0", {"final_lambda": 1.0, "final_remaining": 0.5}
    model = tiny("bert")
    train(model, hybrid(method, **kw), steps=6)
    batch = inputs("bert", seed=3)
    masked = logits(model, batch)
    kept = sparsity_report(model).remaining
    assert kept < 1.0
    units = sparsity_report(model).units
    assert {u.kind for u in units} == {"heads", "neurons"} and any(u.kept < u.total for u in units)
    rows = [(g.members[0].layer.module, g.members[0].layout.size) for g in get_pruner(model).units]
    finalize(model, shrink=True)
    assert torch.allclose(logits(model, batch), masked, atol=1e-5)
    for u, (module, size) in zip(units, rows):  # shrunk to exactly the units the report kept
        assert module.out_features == max(u.kept, 1) * size


def test_global_scope_ranks_heads_with_heads_and_neurons_with_neurons():
    model = tiny("bert")
    opt = train(model, hybrid(scope="global", final_remaining=0.25))
    for kind in ("heads", "neurons"):
        groups = [g for g in opt.pruner.units if g.kind == kind]
        total = sum(g.numel for g in groups)
        assert sum(int(g.mask.sum()) for g in groups) == round(0.25 * total)


def test_unit_scores_get_the_straight_through_gradient_summed_over_the_unit():
    model = tiny("bert")
    policy = hybrid(initial_remaining=0.5, final_remaining=0.5, warmup_steps=0)
    pruner = attach(model, policy)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    captured = {}
    hooks = [layer.module.register_full_backward_hook(
        lambda mod, gin, gout, name=layer.name: captured.__setitem__(name, gout[0]))
        for layer in pruner.layers]
    inputs_seen = {}
    pre = [layer.module.register_forward_pre_hook(
        lambda mod, args, name=layer.name: inputs_seen.__setitem__(name, args[0].detach()))
        for layer in pruner.layers]
    model(**inputs("bert")).loss.backward()
    group = next(g for g in pruner.units if g.kind == "heads")
    expected = torch.zeros(group.shape)
    for member in group.members:
        name, layout = member.layer.name, member.layout
        g2 = captured[name].reshape(-1, captured[name].shape[-1])
        x2 = inputs_seen[name].reshape(-1, inputs_seen[name].shape[-1])
        grad_w_prime = g2.t() @ x2  # dL/dW' (Eq. 2)
        expected += layout.reduce(grad_w_prime * member.layer.weight.detach())
    assert torch.allclose(group.scores.grad, expected, atol=1e-5)
    for h in hooks + pre:
        h.remove()


def test_blocks_have_one_score_per_block_and_cannot_be_shrunk():
    model = tiny("bert")
    policy = PruningPolicy(method="movement", structure="blocks", block_shape=[8, 16],
                           initial_remaining=0.5, final_remaining=0.5, total_steps=4,
                           score_init="uniform", score_init_value=1.0)
    pruner = attach(model, policy)
    query = next(g for g in pruner.units if g.name.endswith("layer.0.attention.self.query"))
    assert query.shape == (4, 2) and int(query.mask.sum()) == 4
    gate = query.members[0].layer.gate()
    assert gate.shape == (32, 32) and int(gate.sum()) == 32 * 32 // 2
    with pytest.raises(Exception, match="shrink removes pruned heads and neurons"):
        finalize(model, shrink=True)


def test_unknown_architectures_are_refused_with_how_to_name_the_groups():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc_in, self.fc_out = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return x + self.fc_out(torch.relu(self.fc_in(x)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return self.out(x)

    torch.manual_seed(0)
    with pytest.raises(TargetingError, match=r"none of the known families.*unit_groups.*"
                                             r"'blocks.0.fc_in'"):
        attach(Net(), PruningPolicy(method="magnitude", structure="neurons", total_steps=4))
    net = Net()
    policy = PruningPolicy(method="magnitude", structure="neurons", total_steps=4,
                           initial_remaining=0.25, final_remaining=0.25,
                           unit_groups=[{"kind": "neurons", "rows": ["fc_in"],
                                         "columns": ["fc_out"]}])
    pruner = attach(net, policy)
    assert [g.name for g in pruner.units] == ["blocks.0.fc_in", "blocks.1.fc_in"]
    assert all(int(g.mask.sum()) == 4 for g in pruner.units)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    expected = net(x)
    finalize(net, shrink=True)
    assert net.blocks[0].fc_in.weight.shape == (4, 8) and net.blocks[0].fc_out.weight.shape == (8, 4)
    assert torch.allclose(net(x), expected, atol=1e-6)


def test_a_unit_must_be_targeted_in_all_its_modules():
    with pytest.raises(TargetingError, match=r"heads of block .* tie .* not targeted"):
        attach(tiny("bert"), hybrid(exclude=["key"]))
    with pytest.raises(PolicyError, match="needs block_shape"):
        PruningPolicy(method="movement", structure="blocks", total_steps=4)


def test_a_block_with_every_unit_pruned_shrinks_to_its_bias():
    model = tiny("bert")
    policy = PruningPolicy(method="magnitude", structure="neurons", total_steps=4,
                           initial_remaining=0.5, final_remaining=0.5)
    pruner = attach(model, policy)
    pruner.units[0].set_mask(torch.zeros(pruner.units[0].shape, dtype=torch.bool))
    batch = inputs("bert")
    masked = logits(model, batch)
    finalize(model, shrink=True)
    layer0 = model.bert.encoder.layer[0]
    assert layer0.intermediate.dense.weight.shape[0] == 1
    assert torch.all(layer0.output.dense.weight == 0)
    assert torch.allclose(logits(model, batch), masked, atol=1e-5)


def test_model_only_checkpoints_carry_unit_masks():
    model = tiny("bert")
    train(model, hybrid())
    state = model.state_dict()
    owner = "bert.encoder.layer.0.attention.self.query"
    assert state[owner + ".pruning_mask"].shape == (4,) and state[owner + ".pruning_scores"].shape == (4,)
    assert "bert.encoder.layer.0.attention.self.key.pruning_scores" not in state
    fresh = tiny("bert", seed=5)
    opt = PruningOptimizer(torch.optim.AdamW(fresh.parameters()), hybrid(), model=fresh)
    fresh.load_state_dict(state)
    assert opt.step_count == 6
    batch = inputs("bert")
    assert torch.allclose(logits(fresh, batch), logits(model, batch))


@pytest.mark.slow
def test_the_job_writes_a_shrunk_model_that_reproduces_its_accuracy(job_assets, tmp_path):
    import json

    import datasets
    from transformers import AutoTokenizer

    from prune_plugin.cli import main
    from prune_plugin.integrations.job import JobError, load_job, run_job

    from .models import job_dict

    job = job_dict(job_assets, tmp_path / "run", structure="hybrid", final_remaining=0.5)
    job["shrink"] = True
    metrics = run_job(load_job(data=job), progress=False)
    out = tmp_path / "run"
    model = load_shrunk(out / "model")
    layer = model.bert.encoder.layer[0]
    assert layer.intermediate.dense.weight.shape == (32, 32)  # half of 64 neurons
    assert layer.attention.self.query.weight.shape == (16, 32)  # 1 of 2 heads
    tok = AutoTokenizer.from_pretrained(out / "model")
    val = datasets.load_dataset(job_assets["data"], "toy")["validation"]
    enc = tok(list(val["sentence"]), padding=True, truncation=True, max_length=16,
              return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1)
    assert float((pred == torch.tensor(val["label"])).double().mean()) == \
        pytest.approx(metrics["eval"]["accuracy"])
    report = json.loads((out / "sparsity.json").read_text())
    assert {u["kind"] for u in report["units"]} == {"heads", "neurons"}
    assert main(["report", str(out)]) == 0
    unstructured = job_dict(job_assets, tmp_path / "other")
    unstructured["shrink"] = True
    with pytest.raises(JobError, match="shrink: true .* needs pruning.structure"):
        load_job(data=unstructured)
