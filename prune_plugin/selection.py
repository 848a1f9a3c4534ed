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


def _count_gt(t: Tensor, x: float) -> int:
    a = _np_view(t)
    if a is not None:
        return int(np.count_nonzero(a > a.dtype.type(x)))
    return int(torch.count_nonzero(t > x))


def _split(t: Tensor, lo: float, hi: float, extract: bool) -> tuple[int, int, Tensor | None]:
    """(# > hi, # > lo, the scores in (lo, hi] in index order if ``extract``)."""
    a = _np_view(t)
    if a is not None:
        g_hi = a > a.dtype.type(hi)
        g_lo = a > a.dtype.type(lo)
        c_hi, c_lo = int(np.count_nonzero(g_hi)), int(np.count_nonzero(g_lo))
        band = torch.from_numpy(a[g_lo ^ g_hi]) if extract and c_lo > c_hi else None
        return c_hi, c_lo, band
    flat = t.detach().reshape(-1)
    g_hi, g_lo = flat > hi, flat > lo
    c_hi, c_lo = int(torch.count_nonzero(g_hi)), int(torch.count_nonzero(g_lo))
    band = flat[g_lo ^ g_hi] if extract and c_lo > c_hi else None
    return c_hi, c_lo, band


def _write_mask_gt(t: Tensor, x: float, out: Tensor) -> None:
    a, o = _np_view(t), None
    if a is not None and out.device.type == "cpu" and out.is_contiguous():
        o = out.view(-1).numpy()
        np.greater(a, a.dtype.type(x), out=o)
    else:
        torch.gt(t.detach(), x, out=out)


def _first_equal(t: Tensor, x: float, count: int) -> Tensor:
    """Flat indices of the first ``count`` elements equal to ``x``."""
    a = _np_view(t)
    if a is not None:
        return torch.from_numpy(np.flatnonzero(a == a.dtype.type(x))[:count])
    return torch.nonzero(t.detach().reshape(-1) == x).reshape(-1)[:count]


# --- selection ---------------------------------------------------------------------------------

def _sample(parts: Sequence[Tensor], n: int, lo: float, hi: float, band_n: int) -> Tensor:
    """A strided sample of the scores in (lo, hi]; balances sorting it against gathering."""
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


def _split_all(parts: Sequence[Tensor], lo: float, hi: float
               ) -> tuple[int, int, list[Tensor] | None]:
    """Counts over all parts and the in-bracket scores of each (None if too many to gather)."""
    c_hi = c_lo = 0
    bands: list[Tensor] | None = []
    for p in parts:
        ch, cl, band = _split(p, lo, hi, extract=bands is not None)
        c_hi += ch
        c_lo += cl
        if bands is not None:
            if c_lo - c_hi > BAND_LIMIT:
                bands = None  # too wide to gather: keep counting, narrow next round
            else:
                bands.append(band if band is not None else p.new_empty(0))
    return c_hi, c_lo, bands


def _next_down(x: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` below ``x``."""
    t = torch.tensor(x, dtype=dtype)
    return float(torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype)))


def kth_largest(parts: Sequence[Tensor], k: int) -> tuple[float, int, list[int] | None]:
    """Exact k-th largest value over ``parts`` (any shapes), 1 <= k <= total size.

    Returns (value, number of elements strictly greater, per-part counts of elements equal to
    value or None when unknown).
    """
    n = sum(p.numel() for p in parts)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    dtype = parts[0].dtype
    lo, hi = -math.inf, math.inf  # invariant: c_hi < k <= c_lo, so the answer is in (lo, hi]
    c_lo, c_hi = n, 0
    bands: list[Tensor] | None = None
    for _ in range(_MAX_ROUNDS):
        band_n = c_lo - c_hi
        if bands is not None and band_n <= BAND_LIMIT:
            break
        if lo == _next_down(hi, dtype):  # every score in the bracket equals hi
            return hi, c_hi, None
        new_lo, new_hi = lo, hi
        if band_n > NARROW_MIN:
            new_lo, new_hi = _narrow(_sample(parts, n, lo, hi, band_n), (k - c_hi) / band_n,
                                     lo, hi, dtype)
        t_hi, t_lo, extracted = _split_all(parts, new_lo, new_hi)
        if t_hi >= k:      # the answer is above new_hi
            lo, c_lo, bands = new_hi, t_hi, None
        elif t_lo < k:     # the answer is at or below new_lo
            hi, c_hi, bands = new_lo, t_lo, None
        else:
            lo, hi, c_lo, c_hi, bands = new_lo, new_hi, t_lo, t_hi, extracted
    else:  # pragma: no cover - the bracket shrinks geometrically; this is a safety net
        bands = [_split(p, lo, hi, extract=True)[2] for p in parts]
        bands = [b if b is not None else p.new_empty(0) for b, p in zip(bands, parts)]
    if lo == _next_down(hi, dtype):
        return hi, c_hi, None
    assert bands is not None
    band = torch.cat([b.reshape(-1) for b in bands])
    if band.dtype in (torch.float16, torch.bfloat16):
        band = band.float()  # exact: kthvalue lacks half kernels on some devices
    r = k - c_hi  # rank of the answer from the top of the band
    value = float(torch.kthvalue(band, band.numel() - r + 1).values)
    greater = c_hi + int(torch.count_nonzero(band > value))
    ties = [int(torch.count_nonzero(b == value)) for b in bands]
    return value, greater, ties


def topv_masks(parts: Sequence[Tensor], k: int, out: Sequence[Tensor] | None = None
               ) -> tuple[list[Tensor], TopVThreshold]:
    """Masks keeping exactly the ``k`` largest scores over ``parts`` (Eq. 1 with v = k / n).

    Ties at the threshold are kept lowest flat index first, part by part. ``out`` are bool
    buffers of the parts' shapes, reused across steps to avoid allocating every step.
    """
    masks = list(out) if out is not None else [torch.empty(p.shape, dtype=torch.bool,
                                                           device=p.device) for p in parts]
    if k == 0:
        for m in masks:
            m.fill_(False)
        return masks, TopVThreshold(math.inf, 0, 0)
    value, greater, ties = kth_largest(parts, k)
    for p, m in zip(parts, masks):
        _write_mask_gt(p, value, m)
    need = k - greater
    threshold = TopVThreshold(value, need, k)
    for i, (p, m) in enumerate(zip(parts, masks)):
        if need == 0:
            break
        if ties is not None and ties[i] == 0:
            continue
        idx = _first_equal(p, value, need)
        m.view(-1)[idx.to(m.device)] = True
        need -= idx.numel()
    return masks, threshold


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
