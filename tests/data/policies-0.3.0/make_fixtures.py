"""Writes tests/data/policies-0.3.0: policies as version 0.3.0 (one flat class) saved them."""
import json
from pathlib import Path
from prune_plugin import PruningPolicy, __version__

S = dict(total_steps=1000, warmup_steps=100, cooldown_steps=200)
INPUTS = {
    "magnitude": dict(method="magnitude", **S),
    "magnitude-global-hybrid": dict(method="magnitude", scope="global", structure="hybrid",
                                    final_remaining=0.3, initial_remaining=0.9, **S),
    "movement": dict(method="movement", final_remaining=0.1, **S),
    "movement-paper": dict(method="movement", score_init="constant", score_lr=0.05,
                           mask_update_every=10, targets=["encoder"], exclude=["pooler"],
                           exclude_heads=False, **S),
    "movement-blocks": dict(method="movement", structure="blocks", block_shape=[32, 32],
                            score_init="uniform", score_init_value=0.5, **S),
    "movement-unit-groups": dict(method="movement", structure="neurons", unit_groups=[
        dict(kind="neurons", rows=["mlp.fc_in"], columns=["mlp.fc_out"], units=64)], **S),
    "soft_movement": dict(method="soft_movement", **S),
    "soft_movement-thresholds": dict(method="soft_movement", initial_threshold=0.01,
                                     final_threshold=0.2, final_lambda=100.0,
                                     lambda_schedule="constant", **S),
    "soft_movement-requested-lambda": dict(method="soft_movement", final_remaining=0.1,
                                           total_steps=2000),
    "soft_movement-requested-topv": dict(method="soft_movement", final_remaining=0.1,
                                         total_steps=1000, warmup_steps=100, cooldown_steps=500),
    "soft_movement-requested-kaiming": dict(method="soft_movement", final_remaining=0.05,
                                            remaining_control="lambda", score_init="kaiming",
                                            initial_remaining=0.8, **S),
    "l0": dict(method="l0", **S),
    "l0-options": dict(method="l0", l0_beta=0.5, l0_left=-0.2, l0_right=1.2,
                       l0_warmup_gates="open", l0_gate_gradient="straight_through",
                       final_lambda=10.0, lambda_schedule="cubic", score_lr=0.2, **S),
    "l0-requested": dict(method="l0", final_remaining=0.1, **S),
    "l0-requested-heads": dict(method="l0", final_remaining=0.5, structure="heads",
                               score_init="constant", score_init_value=3.0,
                               l0_gate_gradient="clamped", **S),
}
out = Path("tests/data/policies-0.3.0")
effective = {}
for name, fields in INPUTS.items():
    p = PruningPolicy.from_dict(fields)
    (out / f"{name}.json").write_text(p.to_json())
    effective[name] = {k: getattr(p, k) for k in type(p).model_fields}
(out / "inputs.json").write_text(json.dumps(INPUTS, indent=1) + "\n")
(out / "effective.json").write_text(json.dumps(effective, indent=1, default=lambda o: o.model_dump()) + "\n")
print(__version__, len(INPUTS))
