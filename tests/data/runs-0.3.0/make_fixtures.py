"""Writes tests/data/runs-0.3.0: runs checkpointed by prune_plugin 0.3.0, before the policy per
method and the composed strategies, and where each run was 3 steps later
(tests/test_compat.py resumes them and must land on the same bits).

Run from the project root with that version installed: python tests/data/runs-0.3.0/make_fixtures.py
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from tests.models import MLP, bert_batch, mlp_batch, tiny_bert  # noqa: E402

from prune_plugin import PruningOptimizer, PruningPolicy, __version__  # noqa: E402

HERE = Path(__file__).resolve().parent
S = dict(total_steps=12, warmup_steps=1, cooldown_steps=2)
RUNS = {
    "magnitude": dict(method="magnitude", final_remaining=0.3, **S),
    "movement": dict(method="movement", final_remaining=0.3, **S),
    "movement-global": dict(method="movement", final_remaining=0.3, scope="global", **S),
    "soft_movement": dict(method="soft_movement", final_threshold=0.4, score_lr=0.5, **S),
    "soft_movement-requested": dict(method="soft_movement", final_remaining=0.3,
                                    remaining_control="lambda", **S),
    "soft_movement-requested-topv": dict(method="soft_movement", final_remaining=0.3,
                                         remaining_control="topv", **S),
    "l0": dict(method="l0", **S),
    "l0-requested": dict(method="l0", final_remaining=0.3, **S),
    "movement-hybrid": dict(method="movement", final_remaining=0.5, structure="hybrid", **S),
    "l0-hybrid-requested": dict(method="l0", final_remaining=0.5, structure="hybrid", **S),
}
BEFORE, AFTER = 5, 3  # steps checkpointed, steps resumed


def build(fields: dict):
    bert = fields.get("structure", "unstructured") != "unstructured"
    model = tiny_bert(seed=0) if bert else MLP(0)
    opt = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2),
                           PruningPolicy(**fields), model=model)
    return model, opt


def train(model, opt, steps: range) -> None:
    bert = not isinstance(model, MLP)
    for i in steps:
        torch.manual_seed(1000 + i)  # L0's gate noise
        if bert:
            loss = model(**bert_batch(seed=i)).loss
        else:
            x, y = mlp_batch(seed=i)
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def kernels() -> str:
    """A digest of dense training with the ops these runs use (no pruning): float results
    depend on the CPU's kernels, so bits compare only where this digest matches the one
    written beside the fixtures."""
    import hashlib

    digest = hashlib.sha256()
    for model in (MLP(0), tiny_bert(seed=0)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for i in range(2):
            torch.manual_seed(1000 + i)
            if isinstance(model, MLP):
                x, y = mlp_batch(seed=i)
                loss = nn.functional.cross_entropy(model(x), y)
            else:
                loss = model(**bert_batch(seed=i)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        for value in state(model).values():
            digest.update(value.numpy().tobytes())
    return digest.hexdigest()[:16]


if __name__ == "__main__":
    torch.set_num_threads(1)  # as the tests run (conftest): reductions split alike
    for name, fields in RUNS.items():
        model, opt = build(fields)
        train(model, opt, range(BEFORE))
        save_file(state(model), HERE / f"{name}.model.safetensors")
        torch.save(opt.state_dict(), HERE / f"{name}.optimizer.pt")
        train(model, opt, range(BEFORE, BEFORE + AFTER))
        save_file(state(model), HERE / f"{name}.after.safetensors")
    (HERE / "kernels.txt").write_text(kernels() + "\n")
    print(__version__, len(RUNS))
