import datasets
import pytest
import torch
from transformers import Trainer, TrainingArguments

from prune_plugin import PruningOptimizer, PruningPolicy, sparsity_report
from prune_plugin.integrations.transformers import (PruningCallback, PruningTrainer,
                                                    classification_metrics, distillation_loss,
                                                    find_pruning_optimizer)

from .models import tiny_bert


def toy_dataset(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (n, 10), generator=g)
    labels = (ids[:, 0] > 50).long()
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8,
                learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=2,
                use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
    return TrainingArguments(**{**base, **kw})


POLICY = PruningPolicy(method="movement", final_remaining=0.25, warmup_steps=1,
                       cooldown_steps=2, total_steps=8)


def test_user_optimizer_with_callback_prunes_and_logs(tmp_path):
    model = tiny_bert()
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), POLICY, model=model)
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=toy_dataset(),
                      optimizers=(opt, None), callbacks=[PruningCallback()])
    trainer.train()
    assert opt.step_count == 8
    assert sparsity_report(model).remaining == pytest.approx(0.25, abs=1e-3)
    logged = [h for h in trainer.state.log_history if "remaining" in h]
    assert logged and logged[-1]["remaining"] == pytest.approx(0.25, abs=1e-3)


def test_callback_refuses_a_schedule_longer_than_the_run(tmp_path):
    model = tiny_bert()
    policy = PruningPolicy(method="movement", final_remaining=0.25, total_steps=100)
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters()), policy, model=model)
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=toy_dataset(),
                      optimizers=(opt, None), callbacks=[PruningCallback()])
    with pytest.raises(ValueError, match=r"total_steps \(100\) exceeds the Trainer's max_steps \(8\)"):
        trainer.train()


def test_callback_without_pruning_optimizer_is_refused(tmp_path):
    trainer = Trainer(model=tiny_bert(), args=args(tmp_path), train_dataset=toy_dataset(),
                      callbacks=[PruningCallback()])
    with pytest.raises(TypeError, match="found no PruningOptimizer"):
        trainer.train()


def test_under_deepspeed_settings_that_would_lose_pruning_are_refused(tmp_path):
    """The Trainer drops optimizers=(...) under DeepSpeed, and a DeepSpeed config's own
    optimizer or scheduler block would replace the pruning optimizer or its score lr."""
    from types import SimpleNamespace

    from prune_plugin.integrations.deepspeed import DeepSpeedConfigError

    ds_args = SimpleNamespace(deepspeed="ds_config.json")
    with pytest.raises(TypeError, match="ignores optimizers"):
        PruningCallback().on_train_begin(ds_args, SimpleNamespace(max_steps=8), None,
                                         optimizer=torch.optim.AdamW(tiny_bert().parameters()))
    trainer = PruningTrainer(model=tiny_bert(), args=args(tmp_path),
                             train_dataset=toy_dataset(), pruning_policy=None)
    entry = {"movement_pruning": {"method": "movement", "final_remaining": 0.3,
                                  "total_steps": 8}}
    for config, match in [({**entry, "optimizer": {"type": "AdamW"}}, "'optimizer' block"),
                          ({**entry, "scheduler": {"type": "WarmupLR"}}, "'scheduler' block"),
                          ({**entry, "movement_pruning": {"method": "magic"}}, "magic")]:
        trainer.args.hf_deepspeed_config = SimpleNamespace(config=config)
        trainer.pruning_policy = None
        with pytest.raises((DeepSpeedConfigError, ValueError), match=match):
            trainer._check_deepspeed()
    trainer.args.hf_deepspeed_config = SimpleNamespace(config=entry)
    trainer._check_deepspeed()  # the policy comes from the entry
    assert trainer.pruning_policy.final_remaining == 0.3
    trainer.pruning_policy = POLICY
    with pytest.raises(DeepSpeedConfigError, match="differs"):
        trainer._check_deepspeed()


def _train(tmp_path, resume_from=None, max_steps=8, **kw):
    torch.manual_seed(0)
    model = tiny_bert()
    trainer = PruningTrainer(model=model, args=args(tmp_path, max_steps=max_steps, **kw),
                             train_dataset=toy_dataset(), pruning_policy=POLICY)
    trainer.train(resume_from_checkpoint=resume_from)
    return model, trainer


def test_pruning_trainer_saves_state_beside_checkpoints_and_resumes_exactly(tmp_path):
    full, _ = _train(tmp_path / "full")
    _, first = _train(tmp_path / "resumed", save_strategy="steps", save_steps=4)
    checkpoint = tmp_path / "resumed" / "checkpoint-4"
    from safetensors.torch import load_file
    saved = load_file(str(checkpoint / "model.safetensors"))  # the model carries the run
    assert int(saved["pruning_step"]) == 4
    assert sum(k.endswith(".pruning_mask") for k in saved) == 12
    resumed, trainer = _train(tmp_path / "resumed", resume_from=str(checkpoint),
                              save_strategy="no")
    assert find_pruning_optimizer(trainer.optimizer).step_count == 8
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_distillation_changes_the_loss_and_matches_the_formula(tmp_path):
    student_logits = torch.tensor([[1.0, -1.0], [0.5, 0.2]])
    teacher_logits = torch.tensor([[2.0, 0.0], [-1.0, 1.0]])
    t = 2.0
    p = torch.softmax(teacher_logits / t, -1)
    q = torch.log_softmax(student_logits / t, -1)
    expected = (p * (p.log() - q)).sum(-1).mean() * t * t
    assert torch.allclose(distillation_loss(student_logits, teacher_logits, t), expected)
    assert torch.allclose(distillation_loss(student_logits[:, :1], teacher_logits[:, :1], t),
                          ((student_logits[:, :1] - teacher_logits[:, :1]) ** 2).mean())

    teacher = tiny_bert(seed=7)
    model = tiny_bert()
    trainer = PruningTrainer(model=model, args=args(tmp_path), train_dataset=toy_dataset(),
                             pruning_policy=POLICY, teacher=teacher, distill_alpha=0.5)
    batch = {"input_ids": torch.randint(5, 100, (4, 10)), "labels": torch.tensor([0, 1, 0, 1])}
    model.eval()  # no dropout: the two forwards below must agree
    loss = trainer.compute_loss(model, batch)
    with torch.no_grad():
        out = model(**batch)
        kd = distillation_loss(out.logits, teacher(input_ids=batch["input_ids"]).logits, 2.0)
    assert torch.allclose(loss, 0.5 * kd + 0.5 * out.loss)


def test_metrics():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    m = classification_metrics(logits, torch.tensor([0, 1, 1, 1]), "classification")
    assert m["accuracy"] == 0.75 and m["f1"] == pytest.approx(0.8)
    r = classification_metrics(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([1.0, 2.0, 2.5]),
                               "regression")
    assert r["spearman"] == pytest.approx(1.0) and 0.9 < r["pearson"] < 1.0
