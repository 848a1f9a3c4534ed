"""Exact Top-v selection (Eq. 1) over one tensor (local) or many (global), without sorting.

Keeping exactly ``k`` of ``n`` scores needs the k-th largest value ``t``; the mask is then
``S > t`` plus the ties ``S == t`` needed to reach ``k``, taken lowest flat index first (layers
in attach order for global), so the choice is deterministic. Scores tie massively after the
first Adam steps (they sit at +-lr), so ties are part of the contract, not an edge case.

Finding ``t``: a strided sample of the scores brackets ``t`` in ``(lo, hi]``; one counting pass
checks the bracket and extracts the few scores inside it; ``kthvalue`` on those gives ``t``
exactly. A full sort or ``kthvalue`` of 85M scores takes ~2.4 s on 2 cores; this takes a few
passes. On CPU, numpy's vectorised comparisons run ~2.5x faster than torch's bool-producing
ones, so CPU float tensors go through numpy views (zero-copy); everything else uses torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy ships with practically every torch install
    np = None  # type: ignore[assignment]

#: Largest number of in-bracket scores gathered for the final ``kthvalue``.
BAND_LIMIT = 1 << 21
#: Brackets holding more scores than this are narrowed from a sample before gathering.
NARROW_MIN = 1 << 14
#: Most scores sampled to place the bracket (fewer for small brackets: ~band^(2/3)).
SAMPLE_SIZE = 1 << 16
_MAX_ROUNDS = 12


@dataclass(frozen=True)
class TopVThreshold:
    """The k-th largest score and how many of the scores equal to it are kept."""

    value: float
    ties_kept: int
    k: int


def topv_count(remaining: float, n: int) -> int:
    """Number of weights kept out of ``n`` at remaining fraction ``remaining``: round(v * n)."""
    return min(n, max(0, round(remaining * n)))


# --- backends: numpy views for CPU float32/64, torch otherwise --------------------------------

def _np_view(t: Tensor):
    if np is not None and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        return t.detach().reshape(-1).numpy()
    return None


def _first_equal(t: Tensor, x: float, count: int) -> Tensor:
    """Flat indices of the first ``count`` elements equal to ``x``."""
    a = _np_view(t)
    if a is not None:
        return torch.from_numpy(np.flatnonzero(a == a.dtype.type(x))[:count])
    return torch.nonzero(t.detach().reshape(-1) == x).reshape(-1)[:count]


# --- selection ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SelectionHint:
    """Where the last threshold was, to bracket the next one (scores move little per step)."""

    value: float
    delta: float


def _sample(parts: Sequence[Tensor], lo: float, hi: float, band_n: int, n: int) -> Tensor:
    """A strided sample of the scores in (lo, hi]; ~band^(2/3) of them balances sorting it
    against gathering the bracket."""
    size = min(SAMPLE_SIZE, max(1024, int(band_n ** (2.0 / 3.0))))
    stride = max(1, band_n // size)
    pieces = [p.detach().reshape(-1)[::stride] for p in parts]
    s = torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()
    if band_n < n:
        s = s[(s > lo) & (s <= hi)]
    return s


def _narrow(sample: Tensor, q: float, lo: float, hi: float, dtype: torch.dtype
            ) -> tuple[float, float]:
    """A bracket (lo', hi'] inside (lo, hi] holding the score of rank ``q`` (fraction from the
    top) with high probability: the sample quantile +- 4 binomial standard deviations."""
    m = sample.numel()
    if m == 0:
        return lo, hi
    ordered = torch.sort(sample, descending=True).values
    j = q * m
    margin = 4.0 * math.sqrt(m * q * (1.0 - q)) + 2.0
    top, bottom = int(math.floor(j - margin)), int(math.ceil(j + margin))
    new_hi = hi if top < 0 else float(ordered[top])
    new_lo = lo if bottom >= m else float(ordered[bottom])
    if new_lo >= new_hi:  # the sample ties around the answer: bracket that value alone
        new_lo = _next_down(new_hi, dtype)
    return new_lo, new_hi


def _next_down(x: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` below ``x``."""
    t = torch.tensor(x, dtype=dtype)
    return float(torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype)))


def _to_dtype(x: float, dtype: torch.dtype) -> float:
    """``x`` rounded to a value of ``dtype`` (bracket ends must be exact in the scores' dtype)."""
    return float(torch.tensor(x, dtype=dtype)) if math.isfinite(x) else x


def _nonzero(flags) -> Any:
    """Positions of the True entries of a numpy bool array: scan 8 flags per uint64 word
    first, since bracket members are few and numpy's flatnonzero is slow per element."""
    n8 = flags.size - flags.size % 8
    words = np.flatnonzero(flags[:n8].view(np.uint64))
    pos = (words[:, None] * 8 + np.arange(8)).reshape(-1)
    pos = pos[flags[pos]]
    if n8 < flags.size:
        pos = np.concatenate([pos, n8 + np.flatnonzero(flags[n8:])])
    return pos


@dataclass
class _Pass:
    """One bracketing pass: masks hold ``S > hi``; counts; in-bracket positions and values."""

    above: int
    inside: int
    positions: list[Tensor] | None
    values: list[Tensor] | None


def _bracket_pass(parts: Sequence[Tensor], masks: Sequence[Tensor], lo: float, hi: float,
                  extract: bool, limit: float = BAND_LIMIT) -> _Pass:
    above = inside = 0
    positions: list[Tensor] | None = [] if extract else None
    values: list[Tensor] | None = [] if extract else None
    for p, m in zip(parts, masks):
        a = _np_view(p)
        mv = m.view(-1).numpy() if a is not None and m.device.type == "cpu" \
            and m.is_contiguous() else None
        if mv is not None:
            np.greater(a, a.dtype.type(hi), out=mv)
            flags = a > a.dtype.type(lo)
            np.bitwise_xor(flags, mv, out=flags)  # lo < S <= hi
            c_above = int(np.count_nonzero(mv))
            c_inside = int(np.count_nonzero(flags))
            if positions is not None and inside + c_inside <= limit:
                pos = _nonzero(flags)
                positions.append(torch.from_numpy(pos))
                values.append(torch.from_numpy(a[pos]))
        else:
            flat = p.detach().reshape(-1)
            torch.gt(flat, hi, out=m.view(-1))
            flags = (flat > lo) ^ m.view(-1)
            c_above = int(torch.count_nonzero(m))
            c_inside = int(torch.count_nonzero(flags))
            if positions is not None and inside + c_inside <= limit:
                pos = torch.nonzero(flags).reshape(-1)
                positions.append(pos)
                values.append(flat[pos])
        above += c_above
        inside += c_inside
        if positions is not None and inside > limit:
            positions = values = None  # too many to gather: count only, narrow next round
    return _Pass(above, inside, positions, values)


def _add_first_equal(parts: Sequence[Tensor], masks: Sequence[Tensor], value: float,
                     need: int) -> None:
    """Keep the first ``need`` scores equal to ``value`` (lowest index, part by part)."""
    for p, m in zip(parts, masks):
        if need == 0:
            return
        idx = _first_equal(p, value, need)
        m.view(-1)[idx.to(m.device)] = True
        need -= idx.numel()


def topv_masks(parts: Sequence[Tensor], k: int, out: Sequence[Tensor] | None = None,
               hint: SelectionHint | None = None
               ) -> tuple[list[Tensor], TopVThreshold, SelectionHint | None]:
    """Masks keeping exactly the ``k`` largest scores over ``parts`` (Eq. 1 with v = k / n).

    Ties at the threshold are kept lowest flat index first, part by part. ``out`` are bool
    buffers of the parts' shapes, reused across steps. ``hint`` (returned by the previous call
    on the same scores) brackets the threshold without sampling; any hint gives the same
    exact result, a good one is just faster.
    """
    n = sum(p.numel() for p in parts)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    masks = list(out) if out is not None else [torch.empty(p.shape, dtype=torch.bool,
                                                           device=p.device) for p in parts]
    if k == 0:
        for m in masks:
            m.fill_(False)
        return masks, TopVThreshold(math.inf, 0, 0), hint
    dtype = parts[0].dtype
    lo, hi = -math.inf, math.inf  # invariant: above(hi) < k <= above(lo): answer in (lo, hi]
    c_lo, c_hi = n, 0
    attempt = None
    if hint is not None and math.isfinite(hint.value):
        attempt = (_to_dtype(hint.value - hint.delta, dtype),
                   _to_dtype(hint.value + hint.delta, dtype))
    result: _Pass | None = None
    for _ in range(_MAX_ROUNDS):
        band_n = c_lo - c_hi
        if attempt is None:
            if lo == _next_down(hi, dtype):
                attempt = (lo, hi)
            elif band_n > NARROW_MIN:
                attempt = _narrow(_sample(parts, lo, hi, band_n, n), (k - c_hi) / band_n,
                                  lo, hi, dtype)
            else:
                attempt = (lo, hi)
        a_lo, a_hi = max(attempt[0], lo), min(attempt[1], hi)
        if a_lo >= a_hi:
            a_lo = _next_down(a_hi, dtype)
        single = a_lo == _next_down(a_hi, dtype)  # every score in the bracket equals a_hi
        stuck = (a_lo, a_hi) == (lo, hi)  # no narrower bracket to try: gather whatever it holds
        attempt = None
        r = _bracket_pass(parts, masks, a_lo, a_hi, extract=not single,
                          limit=math.inf if stuck else BAND_LIMIT)
        if r.above >= k:             # the answer is above a_hi
            lo, c_lo = a_hi, r.above
        elif r.above + r.inside < k:  # the answer is at or below a_lo
            hi, c_hi = a_lo, r.above + r.inside
        else:
            lo, hi, c_lo, c_hi = a_lo, a_hi, r.above + r.inside, r.above
            if single or r.positions is not None:
                result = r
                break
    if result is None:  # pragma: no cover - the bracket shrinks geometrically; a safety net
        result = _bracket_pass(parts, masks, lo, hi, extract=True, limit=math.inf)
    return _finish(parts, masks, k, lo, hi, result, hint, dtype, n)


def _finish(parts: Sequence[Tensor], masks: Sequence[Tensor], k: int, lo: float, hi: float,
            r: _Pass, hint: SelectionHint | None, dtype: torch.dtype, n: int
            ) -> tuple[list[Tensor], TopVThreshold, SelectionHint]:
    need = k - r.above  # how many in-bracket scores to keep; masks already hold S > hi
    if r.positions is None:  # every in-bracket score equals hi
        value = hi
        _add_first_equal(parts, masks, value, need)
    else:
        band = torch.cat(r.values)
        if band.dtype in (torch.float16, torch.bfloat16):
            band = band.float()  # exact: kthvalue lacks half kernels on some devices
        value = float(torch.kthvalue(band, band.numel() - need + 1).values)
        greater = 0
        for m, pos, vals in zip(masks, r.positions, r.values):
            keep = pos[vals > value]
            m.view(-1)[keep.to(m.device)] = True
            greater += keep.numel()
        ties = need - greater
        for m, pos, vals in zip(masks, r.positions, r.values):
            if ties == 0:
                break
            eq = pos[vals == value][:ties]  # positions are ascending: lowest index first
            m.view(-1)[eq.to(m.device)] = True
            ties -= eq.numel()
        need -= greater
    # The next bracket: wide enough for how far the threshold moved, tight enough to gather
    # few scores (~0.1% of them, at least a few thousand).
    inside = max(1, r.inside)
    target = max(4096, n // 1000)
    width = (hi - lo) if math.isfinite(hi - lo) else abs(value) + 1.0
    delta = 0.5 * width * min(4.0, max(0.25, target / inside))
    if hint is not None and math.isfinite(hint.value):
        delta = max(delta, 4.0 * abs(value - hint.value))
    return list(masks), TopVThreshold(value, need, k), SelectionHint(value, max(delta, 1e-12))


def topv_mask_reference(parts: Sequence[Tensor], k: int) -> list[Tensor]:
    """Top-k by a full stable sort: the slow, obviously-correct reference used by tests.

    Sorting by (-score, flat index) keeps the same ties as ``topv_masks``."""
    flat = torch.cat([p.detach().reshape(-1) for p in parts])
    order = torch.sort(-flat, stable=True).indices[:k]
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order] = True
    out, start = [], 0
    for p in parts:
        out.append(keep[start:start + p.numel()].view(p.shape))
        start += p.numel()
    return out
