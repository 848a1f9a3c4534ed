import math

import pytest
import torch

from prune_plugin import selection
from prune_plugin.selection import SelectionHint, topv_count, topv_mask_reference, topv_masks


def _random_parts(g: torch.Generator, kind: str) -> list[torch.Tensor]:
    parts = []
    for _ in range(int(torch.randint(1, 4, (), generator=g))):
        shape = tuple(int(x) for x in torch.randint(1, 30, (2,), generator=g))
        if kind == "normal":
            parts.append(torch.randn(shape, generator=g))
        elif kind == "ties":  # Adam's first steps leave scores at +-lr
            parts.append(torch.randint(-2, 3, shape, generator=g).float() * 0.01)
        elif kind == "zeros":
            parts.append(torch.zeros(shape))
        else:  # bf16-rounded values tie often
            parts.append(torch.randn(shape, generator=g).bfloat16().float())
    return parts


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "bf16"])
def test_topv_equals_stable_sort_reference_and_keeps_exactly_k(kind):
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        parts = _random_parts(g, kind)
        n = sum(p.numel() for p in parts)
        k = int(torch.randint(0, n + 1, (), generator=g))
        masks, threshold, _ = topv_masks(parts, k)
        assert sum(int(m.sum()) for m in masks) == k
        for m, ref in zip(masks, topv_mask_reference(parts, k)):
            assert torch.equal(m, ref)
        if k:
            assert threshold.ties_kept >= 1


@pytest.mark.parametrize("kind", ["normal", "ties", "bf16"])
def test_bracket_narrowing_path_is_exact(monkeypatch, kind):
    # Small limits force the sampled-bracket rounds that large models go through.
    monkeypatch.setattr(selection, "NARROW_MIN", 64)
    monkeypatch.setattr(selection, "BAND_LIMIT", 256)
    monkeypatch.setattr(selection, "BAND_MIN", 128)
    monkeypatch.setattr(selection, "SAMPLE_SIZE", 128)
    g = torch.Generator().manual_seed(2)
    for _ in range(30):
        parts = [p.repeat(8, 8) + 0 * p.sum() for p in _random_parts(g, kind)]
        parts = [p + torch.randn(p.shape, generator=g) * (kind == "normal") for p in parts]
        n = sum(p.numel() for p in parts)
        k = int(torch.randint(1, n + 1, (), generator=g))
        masks, _, _ = topv_masks(parts, k)
        for m, ref in zip(masks, topv_mask_reference(parts, k)):
            assert torch.equal(m, ref)


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "bf16"])
def test_blocked_cpu_pass_is_exact_across_block_and_part_boundaries(monkeypatch, kind):
    # Blocks of 7 scores: in-bracket scores and kept ties straddle blocks and parts, through
    # the sampled rounds, warm hints and single-value brackets.
    monkeypatch.setattr(selection, "CPU_BLOCK", 7)
    monkeypatch.setattr(selection, "NARROW_MIN", 64)
    monkeypatch.setattr(selection, "BAND_LIMIT", 256)
    monkeypatch.setattr(selection, "BAND_MIN", 128)
    monkeypatch.setattr(selection, "SAMPLE_SIZE", 128)
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        parts = [p.repeat(4, 4) for p in _random_parts(g, kind)]
        n = sum(p.numel() for p in parts)
        hint = None
        for k in (1, int(torch.randint(1, n + 1, (), generator=g)), n):
            for _ in range(2):  # cold, then warm-started from its own hint
                masks, threshold, hint = topv_masks(parts, k, hint=hint)
                assert sum(int(m.sum()) for m in masks) == k
                for m, ref in zip(masks, topv_mask_reference(parts, k)):
                    assert torch.equal(m, ref)


@pytest.mark.parametrize("bad", [math.nan, -math.inf])
@pytest.mark.parametrize("many", [False, True])
def test_more_kept_than_scores_that_rank_is_an_error_not_a_short_mask(bad, many):
    # NaN and -inf never fall in a bracket: asking for more than the rest is refused (with
    # more than NARROW_MIN of them it once came back as a mask short of k)
    g = torch.Generator().manual_seed(6)
    p = torch.randn(80_000 if many else 4_000, generator=g)
    p[: p.numel() // 4] = bad
    finite = p.numel() - p.numel() // 4
    for hint in (None, SelectionHint(0.0, 0.1)):
        with pytest.raises(ValueError, match="NaN or -inf"):
            topv_masks([p], finite + 1, hint=hint)
        masks, _, _ = topv_masks([p], finite, hint=hint)  # all that rank: fine
        assert torch.equal(masks[0], p > -math.inf)


def test_torch_backend_for_half_precision_matches_reference():
    g = torch.Generator().manual_seed(3)
    parts = [torch.randn(50, 40, generator=g).bfloat16(), torch.randn(30, 7, generator=g).bfloat16()]
    masks, _, _ = topv_masks(parts, 777)
    for m, ref in zip(masks, topv_mask_reference(parts, 777)):
        assert torch.equal(m, ref)


def test_ties_are_kept_lowest_index_first_across_parts():
    parts = [torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 2.0])]
    masks, threshold, _ = topv_masks(parts, 3)
    assert masks[0].tolist() == [True, True, False]
    assert masks[1].tolist() == [False, True]
    assert threshold.value == 0.0 and threshold.ties_kept == 1


def test_threshold_reports_value_and_kept_ties():
    t = torch.tensor([5.0, 1.0, 3.0, 3.0, 2.0])
    _, threshold, _ = topv_masks([t], 3)
    assert threshold.value == 3.0 and threshold.ties_kept == 2 and threshold.k == 3
    with pytest.raises(ValueError, match=r"k must be in \[0, 5\]"):
        topv_masks([t], 6)


@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_any_hint_gives_the_exact_result(kind, monkeypatch):
    monkeypatch.setattr(selection, "NARROW_MIN", 64)
    monkeypatch.setattr(selection, "BAND_LIMIT", 300)
    monkeypatch.setattr(selection, "BAND_MIN", 100)
    g = torch.Generator().manual_seed(4)
    parts = [torch.randn(60, 50, generator=g), torch.randn(40, 30, generator=g)]
    if kind == "ties":
        parts = [(p * 2).round() * 0.01 for p in parts]
    n = sum(p.numel() for p in parts)
    hints = [None, SelectionHint(0.0, 1e-9), SelectionHint(5.0, 0.1), SelectionHint(-3.0, 10.0),
             SelectionHint(float("nan"), 1.0)]
    for k in (1, 17, n // 3, n - 5, n):
        ref = topv_mask_reference(parts, k)
        hint = None
        for h in hints + [None]:  # the last one reuses the returned hint
            masks, _, hint = topv_masks(parts, k, hint=h if h is not None else hint)
            for m, r in zip(masks, ref):
                assert torch.equal(m, r)


def test_masks_are_written_into_given_buffers():
    t = torch.randn(20, 20)
    buf = torch.empty(20, 20, dtype=torch.bool)
    masks, _, _ = topv_masks([t], 40, out=[buf])
    assert masks[0] is buf and int(buf.sum()) == 40


def test_topv_count_rounds():
    assert topv_count(0.1, 1000) == 100
    assert topv_count(0.1234, 1000) == 123
    assert topv_count(1.0, 7) == 7
    assert topv_count(0.01, 10) == 0


# -- sharded Top-v (radix select), single process ------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_topv_thresholds_match_the_reference(dtype: torch.dtype) -> None:
    from prune_plugin.selection import mask_from_threshold, topv_thresholds

    g = torch.Generator().manual_seed(3)
    for trial in range(60):
        sizes = torch.randint(1, 4000 if trial % 4 == 0 else 60, (3,), generator=g).tolist()
        parts = [torch.randn(n, generator=g).to(dtype) for n in sizes]
        if trial % 3 == 0:
            parts = [(p * 2).round() / 2 for p in parts]  # many ties
        if trial % 5 == 0:
            parts[0] = -parts[0].abs() - 0.0  # negatives and -0.0
        for groups in ([[0], [1], [2]], [[0, 1, 2]]):
            ks = [int(torch.randint(0, sum(sizes[i] for i in grp) + 1, (), generator=g))
                  for grp in groups]
            thresholds = topv_thresholds(parts, groups, ks)
            for grp, k in zip(groups, ks):
                reference = topv_mask_reference([parts[i] for i in grp], k)
                for i, ref in zip(grp, reference):
                    assert torch.equal(mask_from_threshold(parts[i], thresholds[i]), ref)


def test_topv_thresholds_without_the_bracket_and_with_it(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """The bracket only shrinks the radix select's input: when it misses (shards unlike each
    other), every score goes through the radix select and the answer is the same."""
    x = torch.cat([torch.full((5000,), 1.0), torch.randn(20000)])
    k = 5200
    reference = topv_mask_reference([x], k)[0]
    above, survivors = selection._bracket_prefilter([x], [[0]], [k], [x.numel()],
                                                    lambda t: None)
    assert 0 < survivors[0].numel() < x.numel() // 4 and above[0] < k  # it did shrink
    th = selection.topv_thresholds([x], [[0]], [k])
    assert torch.equal(selection.mask_from_threshold(x, th[0]), reference)
    monkeypatch.setattr(selection, "_bracket_prefilter",
                        lambda parts, groups, *rest: ([0] * len(groups), list(parts)))
    th = selection.topv_thresholds([x], [[0]], [k])
    assert torch.equal(selection.mask_from_threshold(x, th[0]), reference)


def test_float_keys_order_like_the_floats() -> None:
    from prune_plugin.selection import float_keys, key_to_float

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.tensor([-math.inf, -2.0, -1.0, -1e-3, -0.0, 0.0, 1e-3, 1.0, 2.0, math.inf],
                         dtype=dtype)
        keys = float_keys(x)
        assert torch.all(keys[1:] >= keys[:-1]) and keys[4] == keys[5]
        assert [key_to_float(int(k), dtype) for k in keys] == [float(v) + 0.0 for v in x]
