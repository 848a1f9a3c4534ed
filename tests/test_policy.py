import json

import pytest
from pydantic import ValidationError

from prune_plugin import PolicyError, PruningPolicy
from prune_plugin.policy import L0Policy, MagnitudePolicy, MovementPolicy, SoftMovementPolicy

BASE = dict(method="movement", final_remaining=0.1, warmup_steps=5, cooldown_steps=5,
            total_steps=100)


def test_the_issue_example_builds():
    p = PruningPolicy(method="movement", final_remaining=0.10, warmup_steps=500,
                      cooldown_steps=1000, total_steps=10_000)
    assert p.scope == "local" and p.score_lr == 1e-2 and p.initial_remaining == 1.0


@pytest.mark.parametrize("method", ["magnitude", "movement", "soft_movement", "l0"])
def test_dump_validate_round_trip(method):
    p = PruningPolicy(method=method, total_steps=50)
    assert PruningPolicy.model_validate_json(p.to_json()) == p
    assert PruningPolicy.model_validate(p.model_dump()) == p


def test_method_defaults_follow_the_original_code():
    l0 = PruningPolicy(method="l0", total_steps=10)
    assert (l0.score_init_value, l0.final_lambda, l0.lambda_schedule, l0.score_lr) == \
        (2.197, 125.0, "constant", 0.1)
    soft = PruningPolicy(method="soft_movement", total_steps=10)
    assert (soft.final_threshold, soft.final_lambda, soft.lambda_schedule) == (0.1, 400.0, "cubic")


def test_unknown_method_names_value_allowed_and_suggestion():
    with pytest.raises(PolicyError, match=r"method: got 'movment'.*'magnitude'.*Did you mean 'movement'"):
        PruningPolicy(**{**BASE, "method": "movment"})


def test_unknown_field_is_refused_with_suggestion():
    with pytest.raises(PolicyError, match=r"final_remainig: unknown field.*Did you mean 'final_remaining'"):
        PruningPolicy(**{**BASE, "final_remainig": 0.1})


def test_out_of_range_names_field_value_and_bound():
    with pytest.raises(PolicyError, match=r"final_remaining: got 1.5 .*less than or equal to 1"):
        PruningPolicy(**{**BASE, "final_remaining": 1.5})
    with pytest.raises(PolicyError, match=r"final_remaining: got 0.0 .*greater than 0"):
        PruningPolicy(**{**BASE, "final_remaining": 0.0})


def test_strict_types_refuse_strings_for_numbers():
    with pytest.raises(PolicyError, match="total_steps: got '100'"):
        PruningPolicy(**{**BASE, "total_steps": "100"})


def test_missing_required_field():
    with pytest.raises(PolicyError, match="total_steps: required field is missing"):
        PruningPolicy(method="movement")


def test_warmup_plus_cooldown_cannot_exceed_total():
    with pytest.raises(PolicyError, match=r"warmup_steps \(60\) \+ cooldown_steps \(50\).*Fix"):
        PruningPolicy(**{**BASE, "warmup_steps": 60, "cooldown_steps": 50})


def test_final_above_initial_is_refused():
    with pytest.raises(PolicyError, match="final_remaining .* above initial_remaining"):
        PruningPolicy(**{**BASE, "initial_remaining": 0.5, "final_remaining": 0.6})


@pytest.mark.parametrize("field,value,method", [
    ("final_lambda", 10.0, "movement"),
    ("final_threshold", 0.1, "l0"),
    ("scope", "global", "l0"),
    ("l0_beta", 0.5, "soft_movement"),
    ("score_lr", 0.1, "magnitude"),
    ("l0_gate_gradient", "straight_through", "movement"),
    ("l0_warmup_gates", "open", "soft_movement"),
    ("score_init_offset", 1.0, "magnitude"),
])
def test_method_specific_fields_only_with_their_method(field, value, method):
    with pytest.raises(PolicyError, match=f"field '{field}'.*does not apply to method '{method}'"):
        PruningPolicy(method=method, total_steps=10, **{field: value})


def test_l0_options_validate_and_round_trip():
    p = PruningPolicy(method="l0", total_steps=50, final_remaining=0.1,
                      score_init_offset=2.197, l0_gate_gradient="straight_through",
                      l0_warmup_gates="open")
    assert PruningPolicy.model_validate_json(p.to_json()) == p
    with pytest.raises(PolicyError, match="l0_gate_gradient.*'clamped'.*'straight_through'"):
        PruningPolicy(method="l0", total_steps=50, l0_gate_gradient="through")
    with pytest.raises(PolicyError, match="l0_warmup_gates.*'sampled'.*'open'"):
        PruningPolicy(method="l0", total_steps=50, l0_warmup_gates="dense")


def test_invalid_regex_is_refused():
    with pytest.raises(PolicyError, match=r"targets\[0\] = '\(' is not a valid regular expression"):
        PruningPolicy(**{**BASE, "targets": ["("]})


def test_policy_is_immutable():
    p = PruningPolicy(**BASE)
    with pytest.raises(ValidationError, match="frozen"):
        p.final_remaining = 0.5  # type: ignore[misc]


def test_from_file_json_and_yaml(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(BASE))
    (tmp_path / "p.yaml").write_text("method: movement\nfinal_remaining: 0.1\nwarmup_steps: 5\n"
                                     "cooldown_steps: 5\ntotal_steps: 100\ntargets: [encoder]\n")
    assert PruningPolicy.from_file(tmp_path / "p.json") == PruningPolicy(**BASE)
    assert PruningPolicy.from_file(tmp_path / "p.yaml").targets == ["encoder"]


def test_from_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: movement\ntotal_steps: -3\n")
    with pytest.raises(PolicyError, match=r"(?s)bad.yaml.*total_steps: got -3"):
        PruningPolicy.from_file(bad)
    with pytest.raises(PolicyError, match="does not exist"):
        PruningPolicy.from_file(tmp_path / "missing.json")
    (tmp_path / "p.toml").write_text("")
    with pytest.raises(PolicyError, match="suffix '.toml'"):
        PruningPolicy.from_file(tmp_path / "p.toml")


def test_policy_error_is_a_value_error():
    with pytest.raises(ValueError):
        PruningPolicy(method="nope", total_steps=1)


def test_json_schema_lists_the_methods():
    schema = PruningPolicy.model_json_schema()
    mapping = schema["discriminator"]["mapping"]
    assert set(mapping) == {"magnitude", "movement", "soft_movement", "l0"}
    for method, ref in mapping.items():
        definition = schema["$defs"][ref.rsplit("/", 1)[1]]
        assert definition["properties"]["method"]["const"] == method
        assert {"method", "total_steps"} <= set(definition["required"])


@pytest.mark.parametrize("method,model,own", [
    ("magnitude", MagnitudePolicy, {"scope", "initial_remaining", "final_remaining"}),
    ("movement", MovementPolicy, {"scope", "initial_remaining", "final_remaining", "score_lr",
                                  "score_init", "score_init_value", "score_init_offset"}),
    ("soft_movement", SoftMovementPolicy, {
        "initial_remaining", "final_remaining", "remaining_control", "initial_threshold",
        "final_threshold", "score_lr", "score_init", "score_init_value", "score_init_offset",
        "final_lambda", "lambda_schedule"}),
    ("l0", L0Policy, {"initial_remaining", "final_remaining", "score_lr", "score_init",
                      "score_init_value", "score_init_offset", "final_lambda",
                      "lambda_schedule", "l0_beta", "l0_left", "l0_right", "l0_gate_gradient",
                      "l0_warmup_gates"}),
])
def test_each_method_has_its_own_model_with_exactly_its_fields(method, model, own):
    shared = {"method", "targets", "exclude", "exclude_heads", "structure", "block_shape",
              "unit_groups", "warmup_steps", "cooldown_steps", "total_steps",
              "mask_update_every"}
    policy = PruningPolicy(method=method, total_steps=10)
    assert type(policy) is model and isinstance(policy, PruningPolicy)
    assert set(model.model_fields) == shared | own
    assert PruningPolicy.from_dict({"method": method, "total_steps": 10}) == policy
    assert model(method=method, total_steps=10) == policy


def test_declared_defaults_are_the_effective_ones():
    # no hidden defaults: what the schema declares (or a default factory computes from the
    # fields before it) is what a policy built from nothing but the required fields holds
    for model in (MagnitudePolicy, MovementPolicy, SoftMovementPolicy, L0Policy):
        method = model.model_fields["method"].annotation.__args__[0]
        policy = model(method=method, total_steps=10)
        for name, info in model.model_fields.items():
            if info.default_factory is None and not info.is_required():
                assert getattr(policy, name) == info.default, (method, name)
