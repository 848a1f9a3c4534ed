import torch

from prune_plugin import (PruningOptimizer, PruningPolicy, SparsityReport, finalize,
                          sparsity_report)

from .models import MLP, tiny_bert


def test_report_counts_masks_per_layer_and_in_total():
    model = tiny_bert()
    policy = PruningPolicy(method="movement", scope="global", initial_remaining=0.25,
                           final_remaining=0.25, total_steps=5)
    PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), policy, model=model)
    report = sparsity_report(model)
    assert len(report.layers) == 12
    assert report.kept == round(0.25 * report.total)
    d = report.as_dict()
    assert d["remaining"] == report.remaining and len(d["layers"]) == 12
    assert SparsityReport.from_dict(d) == report
    # The paper's count: biases and LayerNorms under the scope count as remaining.
    encoder = [p for n, p in model.named_parameters()
               if n.startswith(report.scope + ".") and not n.endswith("pruning_scores")]
    others = sum(p.numel() for p in encoder) - report.total
    assert report.scope == "bert.encoder.layer"
    assert report.scope_kept == report.kept + others
    assert report.scope_total == sum(p.numel() for p in encoder)
    text = str(report)
    assert "bert.encoder.layer.0.attention.self.query" in text and "pruned layers (12)" in text


def test_report_of_a_finalized_model_counts_nonzero_weights():
    model = MLP()
    policy = PruningPolicy(method="magnitude", initial_remaining=0.5, final_remaining=0.5,
                           total_steps=5)
    PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), policy, model=model)
    attached = sparsity_report(model)
    finalize(model)
    plain = sparsity_report(model)
    assert [(l.name, l.kept, l.total) for l in plain.layers] == \
        [(l.name, l.kept, l.total) for l in attached.layers]
    assert plain.scope == "" and plain.scope_total == sum(p.numel() for p in model.parameters())
