import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from prune_plugin.masks import (add_sigmoid_slope_, expected_l0, expected_l0_grad, floored,
                                hard_concrete_gate, l0_eval_gate, l0_linear, l0_noise, l0_shift,
                                masked_linear, noise_logits, noise_to_uniform, sigmoid_penalty,
                                sigmoid_penalty_grad, threshold_mask)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 7, generator=g) > 0.5
    return x, w, b, s, mask


def test_forward_is_linear_with_masked_weight():
    x, w, b, s, mask = _inputs()
    assert torch.allclose(masked_linear(x, w, b, mask, s), F.linear(x, w * mask, b))


def test_straight_through_gradients_match_eq2_via_autograd():
    x, w, b, s, mask = _inputs()
    out = masked_linear(x, w, b, mask, s)
    g_out = torch.randn_like(out)
    gx, gw, gb, gs = torch.autograd.grad(out, (x, w, b, s), g_out)

    # Reference: W' = W * M as a leaf; Eq. 2 says dL/dS = dL/dW' * W, dL/dW = dL/dW' * M.
    wm = (w * mask).detach().requires_grad_(True)
    ref = F.linear(x, wm, b)
    rx, rwm, rb = torch.autograd.grad(ref, (x, wm, b), g_out)
    assert torch.allclose(gx, rx) and torch.allclose(gb, rb)
    assert torch.allclose(gw, rwm * mask)
    assert torch.allclose(gs, rwm * w)
    # Eq. 2 elementwise: dL/dS_ij = sum over tokens of dL/da_i * W_ij * x_j
    manual = torch.einsum("bti,btj->ij", g_out, x) * w
    assert torch.allclose(gs, manual)


@pytest.mark.parametrize("axis", [0, 1])
def test_a_score_per_row_or_column_gets_the_summed_eq2_gradient(axis):
    """Structured pruning: scores (and the mask) broadcast along the weight's rows or columns;
    the scores' gradient is Eq. 2 summed over what each covers, without the whole product."""
    x, w, b, _, _ = _inputs()
    shape = (w.shape[0], 1) if axis == 0 else (1, w.shape[1])
    g = torch.Generator().manual_seed(3)
    s = torch.randn(shape, dtype=w.dtype, generator=g).requires_grad_(True)
    mask = torch.rand(shape, generator=g) > 0.4
    out = masked_linear(x, w, b, mask, s)
    g_out = torch.randn_like(out)
    gx, gw, gs = torch.autograd.grad(out, (x, w, s), g_out)
    wm = (w * mask).detach().requires_grad_(True)
    rx, rwm = torch.autograd.grad(F.linear(x, wm, b), (x, wm), g_out)
    assert gs.shape == shape
    assert torch.allclose(gs, (rwm * w).sum(1 - axis, keepdim=True))
    assert torch.allclose(gw, rwm * mask) and torch.allclose(gx, rx)


def test_all_kept_mask_none_still_gives_score_gradient():
    x, w, b, s, _ = _inputs(1)
    out = masked_linear(x, w, b, None, s)
    assert torch.allclose(out, F.linear(x, w, b))
    gw, gs = torch.autograd.grad(out.sum(), (w, s))
    assert torch.allclose(gs, gw * w)


def test_without_scores_weight_gradient_is_masked():
    x, w, b, _, mask = _inputs(2)
    (gw,) = torch.autograd.grad(masked_linear(x, w, b, mask).sum(), (w,))
    assert torch.all(gw[~mask] == 0) and torch.any(gw[mask] != 0)


def test_threshold_mask_is_sigmoid_above_tau():
    s = torch.linspace(-5, 5, 101)
    assert threshold_mask(s, 0.0) is None
    assert torch.equal(threshold_mask(s, 0.1), torch.sigmoid(s) > 0.1)


def test_l0_eval_gate_formula_and_sampled_gate_range():
    s = torch.linspace(-6, 6, 50)
    expected = torch.clamp((1.1 + 0.1) * torch.sigmoid(s) - 0.1, 0, 1)
    assert torch.allclose(l0_eval_gate(s, left=-0.1, right=1.1), expected)
    gate = hard_concrete_gate(s.repeat(200, 1), beta=2 / 3, left=-0.1, right=1.1,
                              generator=torch.Generator().manual_seed(0))
    assert gate.min() == 0.0 and gate.max() == 1.0  # the stretch gives exact zeros and ones
    # high scores are mostly open, low ones mostly closed
    assert gate[:, -1].mean() > 0.95 and gate[:, 0].mean() < 0.05


def test_l0_gate_gradient_is_eq3():
    torch.manual_seed(0)
    s = torch.randn(64, dtype=torch.float64, requires_grad=True)
    noise = l0_noise(s.shape, s.device, torch.Generator().manual_seed(1))
    gate = hard_concrete_gate(s, beta=2 / 3, left=-0.1, right=1.1, noise=noise)
    (g,) = torch.autograd.grad(gate.sum(), (s,))
    u = noise_to_uniform(noise, torch.float64)
    sbar = torch.sigmoid((torch.log(u) - torch.log1p(-u) + s.detach()) / (2 / 3))
    z = 1.2 * sbar - 0.1
    f = 1.2 / (2 / 3) * sbar * (1 - sbar) * ((z >= 0) & (z <= 1))
    assert torch.allclose(g, f)


def test_l0_noise_is_uniform_on_a_fine_grid():
    noise = l0_noise(torch.Size([200_000]), torch.device("cpu"), torch.Generator().manual_seed(0))
    u = noise_to_uniform(noise, torch.float64)
    assert noise.dtype == torch.int16 and u.min() >= 1e-4 and u.max() <= 1 - 1e-4
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    assert len(torch.unique(u)) > 60_000  # 65,536 levels, not a coarse one


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_l0_noise_logits_looked_up_are_the_formulas_bits(dtype):
    # the table of the 65,536 levels gives what log u - log(1 - u) gives, bit for bit, on every
    # level and on a large draw (its vectorized kernels, not only the table's)
    levels = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    draw = l0_noise(torch.Size([1000, 999]), torch.device("cpu"),
                    torch.Generator().manual_seed(3))
    for noise in (levels, draw, draw.t()):
        u = noise_to_uniform(noise, dtype)
        assert torch.equal(noise_logits(noise, dtype), torch.log(u) - torch.log1p(-u))


@pytest.mark.parametrize("floor,through_top,open_gates", [
    (None, False, False), (0.3, False, False), (None, True, False), (None, False, True),
    (None, True, True)])
def test_l0_linear_matches_autograd_through_the_sampled_gate(floor, through_top, open_gates):
    # floor: L0 at a requested fraction holds kept gates at max(S, floor) in the cool-down,
    # straight-through (the reference: floored(), autograd through it); through_top: the
    # gradient passes the clamp at 1; open_gates (an open warm-up): the value is 1, the
    # gradient the sampled gate's
    x, w, b, s, _ = _inputs(3)
    noise = l0_noise(s.shape, s.device, torch.Generator().manual_seed(5))
    out = l0_linear(x, w, b, s, noise, beta=2 / 3, left=-0.1, right=1.1, floor=floor,
                    through_top=through_top, open_gates=open_gates)
    gate = hard_concrete_gate(floored(s, floor), beta=2 / 3, left=-0.1, right=1.1, noise=noise,
                              through_top=through_top)
    if open_gates:
        gate = gate + (1.0 - gate).detach()
    if floor is not None:
        assert bool((s < floor).any())  # some scores are held up
    ref = F.linear(x, w * gate, b)
    assert torch.allclose(out, ref)
    g_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, b, s), g_out)
    want = torch.autograd.grad(ref, (x, w, b, s), g_out)
    assert any(float(g.abs().sum()) > 0 for g in got)
    for a, r in zip(got, want):
        assert torch.allclose(a, r)


def test_l0_gate_through_top_keeps_the_value_and_lets_open_gates_learn():
    s = torch.full((4000,), 4.0, dtype=torch.float64, requires_grad=True)
    noise = l0_noise(s.shape, s.device, torch.Generator().manual_seed(2))
    clamped = hard_concrete_gate(s, beta=2 / 3, left=-0.1, right=1.1, noise=noise)
    through = hard_concrete_gate(s, beta=2 / 3, left=-0.1, right=1.1, noise=noise,
                                 through_top=True)
    assert torch.equal(clamped, through)
    at_one = clamped.detach() == 1.0
    assert float(at_one.double().mean()) > 0.9  # log-alpha 4: nearly every gate is open
    (g_clamped,) = torch.autograd.grad(clamped.sum(), (s,))
    (g_through,) = torch.autograd.grad(through.sum(), (s,))
    assert bool((g_clamped[at_one] == 0).all())
    assert bool((g_through[at_one] > 0).all())
    assert torch.equal(g_clamped[~at_one], g_through[~at_one])


@pytest.mark.parametrize("penalty,grad", [
    (sigmoid_penalty, sigmoid_penalty_grad),
    (lambda s: expected_l0(s, beta=2 / 3, left=-0.1, right=1.1),
     lambda s: expected_l0_grad(s, beta=2 / 3, left=-0.1, right=1.1))])
def test_penalty_grad_is_autograd_of_value(penalty, grad):
    s = torch.randn(30, dtype=torch.float64, requires_grad=True,
                    generator=torch.Generator().manual_seed(0))
    (g,) = torch.autograd.grad(penalty(s), (s,))
    assert torch.allclose(grad(s.detach()), g)


@pytest.mark.parametrize("shift", [0.0, l0_shift(beta=2 / 3, left=-0.1, right=1.1)])
@pytest.mark.parametrize("factor", [None, 0.25])
def test_the_one_pass_penalty_gradient_adds_scale_times_autograd(shift, factor):
    """What the step adds to the scores' gradient: grad + scale * factor * d/dS sum
    sigmoid(S - shift), in place (the penalty's own autograd as the reference)."""
    g = torch.Generator().manual_seed(2)
    s = torch.randn(6, 9, dtype=torch.float64, requires_grad=True, generator=g)
    grad = torch.randn(6, 9, dtype=torch.float64, generator=g)
    (dr,) = torch.autograd.grad(torch.sigmoid(s - shift).sum(), (s,))
    expected = grad + 0.3 * (1.0 if factor is None else factor) * dr
    add_sigmoid_slope_(grad, s.detach(), torch.tensor(0.3, dtype=torch.float64),
                       None if factor is None else torch.tensor(factor, dtype=torch.float64),
                       shift)
    assert torch.allclose(grad, expected)


def test_expected_l0_formula():
    s = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z = s - 2 / 3 * math.log(0.1 / 1.1)  # E[L0] = sigmoid(S - b log(-l/r))
    assert torch.allclose(expected_l0(s, beta=2 / 3, left=-0.1, right=1.1), torch.sigmoid(z).sum())


@pytest.mark.slow
@pytest.mark.parametrize("transposed", [False, True])
def test_the_fused_passes_compiled_give_the_eager_values(monkeypatch, transposed):
    # CUDA runs them compiled (one kernel each); compiled here by the CPU backend, they give
    # the eager values (and the same gradient written in place), contiguous, for plain and
    # transposed (Conv1D) weights and unit masks
    from prune_plugin import masks

    torch.manual_seed(0)
    w = torch.randn(48, 40)
    w = w.t().contiguous().t() if transposed else w  # (a view with the other strides)
    s, grad = torch.randn(48, 40), torch.randn(48, 40)
    noise = l0_noise(s.shape, s.device, torch.Generator().manual_seed(4))
    cases = [  # (op, arguments, where the gradient is, if the op writes it in place)
        ("masked_weight", (w, torch.rand(48, 40) > 0.5, torch.bfloat16), None),
        ("masked_weight", (w, torch.rand(48, 1) > 0.5, torch.bfloat16), None),
        ("masked_grads_", (grad, w, torch.rand(48, 40) > 0.5), 0),
        ("masked_grads_", (grad, w, torch.rand(48, 1) > 0.5, 1), 0),  # a score per row
        ("add_sigmoid_slope_", (grad, s, torch.tensor(0.3), None, 0.0), 0),
        ("add_sigmoid_slope_", (grad, s, torch.tensor(0.3), torch.tensor(0.5), 1.2), 0),
        ("l0_gated_weight", (w, s, noise, torch.rand(48, 40) > 0.3, 2 / 3, -0.1, 1.1, None,
                             torch.bfloat16), None),
        ("l0_gated_weight", (w, s, noise, None, 2 / 3, -0.1, 1.1, 0.5, torch.float32), None),
        ("l0_grads_", (grad, w, s, noise, torch.rand(48, 40) > 0.3, 2 / 3, -0.1, 1.1, None,
                       False, False, True, True, True), 0),
        ("l0_grads_", (grad, w, s, noise, None, 2 / 3, -0.1, 1.1, 0.2, True, False, False,
                       True, True), 0),
    ]

    def run(name, args, written):
        args = list(args)
        if written is not None:
            args[written] = args[written].clone()
        out = getattr(masks, name)(*args)
        out = () if out is None else out if isinstance(out, tuple) else (out,)
        return out + ((args[written],) if written is not None else ())

    eager = [run(*case) for case in cases]
    monkeypatch.setattr(masks, "_compiles", lambda t: True)
    for case, want in zip(cases, eager):
        for a, b in zip(run(*case), want):
            assert a.is_contiguous() and a.dtype == b.dtype and a.shape == b.shape, case[0]
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6, msg=case[0])
    assert set(masks._COMPILED) == {"_masked_weight", "_masked_grads", "_l0_gated_weight",
                                    "_l0_grads", "_add_sigmoid_slope"}
    assert all(c is not getattr(masks, name) for name, c in masks._COMPILED.items())  # compiled


def test_a_pass_that_fails_to_compile_runs_its_eager_ops_and_says_so(monkeypatch):
    from prune_plugin import masks

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no Triton for this GPU")
        return run
    monkeypatch.setattr(masks, "_compiles", lambda t: True)
    monkeypatch.setattr(masks, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken)
    w, m = torch.randn(6, 5), torch.rand(6, 5) > 0.5
    with pytest.warns(RuntimeWarning, match="compiling _masked_weight failed.*eager ops"):
        got = masks.masked_weight(w, m, torch.bfloat16)
    assert torch.equal(got, (w * m).to(torch.bfloat16))
    assert masks._COMPILED["_masked_weight"] is masks._masked_weight  # once: eager from now on


def test_a_later_compile_failure_falls_back_to_eager_and_a_real_error_still_raises(
        monkeypatch):
    # fullgraph=True turns dynamo's recompile limit into an error at whatever step a new
    # dtype or layout shows up; that step and the later ones run eagerly, as after any
    # compiler failure. An error of the computation itself, even one dynamo reports while
    # retracing, is the user's to see, and compiling stays on.
    from torch._dynamo.exc import BackendCompilerFailed, FailOnRecompileLimitHit, TorchRuntimeError

    from prune_plugin import masks

    w, m = torch.randn(6, 5), torch.rand(6, 5) > 0.5
    want = (w * m).to(torch.bfloat16)
    backend_failed = BackendCompilerFailed(lambda: None, RuntimeError("ptxas"), None)
    for later in (FailOnRecompileLimitHit("Hard failure due to fullgraph=True"),
                  backend_failed):
        calls: list[int] = []

        def flaky(fn, later=later, calls=calls, **kwargs):
            def run(*args):
                calls.append(len(calls))
                if len(calls) == 2:  # dynamo retracing a call the eager ops reject too
                    raise TorchRuntimeError("a shape the computation rejects")
                if len(calls) == 3:
                    raise later
                return fn(*args)
            return run
        monkeypatch.setattr(masks, "_compiles", lambda t: True)
        monkeypatch.setattr(masks, "_COMPILED", {})
        monkeypatch.setattr(torch, "compile", flaky)
        assert torch.equal(masks.masked_weight(w, m, torch.bfloat16), want)  # compiled
        with warnings.catch_warnings(), pytest.raises(RuntimeError, match="must match"):
            warnings.simplefilter("error")  # and no word of compiling
            masks.masked_weight(w, m[:3], torch.bfloat16)
        assert masks._COMPILED["_masked_weight"] is not masks._masked_weight  # still compiled
        with pytest.warns(RuntimeWarning, match=f"compiling _masked_weight failed.*"
                                                f"{type(later).__name__}"):
            assert torch.equal(masks.masked_weight(w, m, torch.bfloat16), want)
        assert masks._COMPILED["_masked_weight"] is masks._masked_weight
        assert torch.equal(masks.masked_weight(w, m, torch.bfloat16), want) and len(calls) == 3
