"""Exact Top-v selection (Eq. 1) over one tensor (local) or many (global).

Keeping exactly ``k`` of ``n`` scores needs the k-th largest value ``t``; the mask is then
``S > t`` plus the ties ``S == t`` needed to reach ``k``, taken lowest flat index first (layers
in attach order for global), so the choice is deterministic. Scores tie massively after the
first Adam steps (they sit at +-lr), so ties are part of the contract, not an edge case.

Three implementations, one contract (each is tested against ``topv_mask_reference``):

- **CPU** (:func:`topv_masks`): a strided sample brackets ``t`` in ``(lo, hi]``; one counting
  pass, block by block while each block is in cache, writes ``S > hi``, checks the bracket and
  gathers the few scores inside it with their indices; a partition of those gives ``t``
  exactly, and the kept ones are set by index. A full sort of 85M scores takes ~2.4 s on 2
  cores; this takes about one read of them (~50 ms), warm-started from the last threshold.
  Its decisions read values back (free on a CPU), and numpy's comparisons run ~2.5x faster
  than torch's there, so CPU float tensors go through numpy views (zero-copy).
- **Accelerators** (:func:`topv_rows`): device operations only, never a read back to the
  host, so the step never stalls the device's queue: ``torch.topk`` gives the k-th value of
  each row, one compare pass the mask, a cumulative count the ties. Layers of one shape are
  stacked as rows and selected together.
- **Sharded scores** (:func:`topv_thresholds`, ZeRO-3): a radix select over order-preserving
  integer keys whose digit decisions are all-reduced histograms, kept on the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy ships with practically every torch install
    np = None  # type: ignore[assignment]

#: Most in-bracket scores gathered for the final ``kthvalue``: 1% of the scores, between
#: 64K and 2M. A bracket holding more is narrowed first; on tied scores (the first Adam steps
#: leave them on a lattice of +-lr multiples) that ends on one tied value, gathered never.
BAND_LIMIT = 1 << 21
BAND_MIN = 1 << 16
#: Brackets holding more scores than this are narrowed from a sample before gathering.
NARROW_MIN = 1 << 14
#: Most scores sampled to place the bracket (fewer for small brackets: ~band^(2/3)).
SAMPLE_SIZE = 1 << 16
_MAX_ROUNDS = 12


def topv_count(remaining: float, n: int) -> int:
    """Number of weights kept out of ``n`` at remaining fraction ``remaining``: round(v * n)."""
    return min(n, max(0, round(remaining * n)))


def use_device_path(t: Tensor) -> bool:
    """Whether selections on ``t`` take the sync-free device path (every device but the CPU,
    where reading values back costs nothing and the sampled bracket is faster)."""
    return t.device.type != "cpu"


# --- backends: numpy views for CPU float32/64, torch otherwise --------------------------------

def _np_view(t: Tensor):
    if np is not None and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        return t.detach().reshape(-1).numpy()
    return None


def _first_equal(t: Tensor, x: float, count: int) -> Tensor:
    """Flat indices of the first ``count`` elements equal to ``x``."""
    a = _np_view(t)
    if a is None:
        return torch.nonzero(t.detach().reshape(-1) == x).reshape(-1)[:count]
    # block by block, stopping at the count: tied scores are often a third of a layer
    value, found = a.dtype.type(x), []
    equal = np.empty(min(CPU_BLOCK, a.size), dtype=np.bool_)
    for start in range(0, a.size, CPU_BLOCK):
        block = a[start:start + CPU_BLOCK]
        eq = equal[:block.size]
        np.equal(block, value, out=eq)
        at = np.flatnonzero(eq)[:count]
        found.append(at + start)
        count -= at.size
        if count == 0:
            break
    return torch.from_numpy(np.concatenate(found) if found else np.empty(0, dtype=np.int64))


# --- selection ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SelectionHint:
    """Where the last threshold was, to bracket the next one (scores move little per step)."""

    value: float
    delta: float
    #: Whether the last threshold fell inside the bracket this hint's predecessor proposed.
    #: Early in training every score moves by about the score lr per step and the threshold
    #: jumps; a hint that keeps missing costs a pass, so it is used only while it predicts.
    reliable: bool = True


def _sample(parts: Sequence[Tensor], lo: float, hi: float, band_n: int, n: int) -> Tensor:
    """A strided sample of the scores in (lo, hi]; ~4 band^(2/3) of them balances sampling
    against gathering the bracket."""
    size = min(SAMPLE_SIZE, max(1024, 4 * int(band_n ** (2.0 / 3.0))))
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
    j = q * m  # rank from the top; in ascending order the answer sits near m - j
    margin = 4.0 * math.sqrt(m * q * (1.0 - q)) + 2.0
    top, bottom = int(math.floor(j - margin)), int(math.ceil(j + margin))
    ranks = [m - 1 - r for r in (top, bottom) if 0 <= r < m]  # ascending positions
    if ranks:
        a = _np_view(sample)  # None off the CPU: numpy cannot read device memory
        if a is not None:
            picked = np.partition(a, ranks)[ranks]  # linear time, unlike a sort
            values = {r: float(v) for r, v in zip(ranks, picked)}
        else:
            ordered = torch.sort(sample).values
            values = {r: float(ordered[r]) for r in ranks}
    new_hi = hi if not 0 <= top < m else values[m - 1 - top]
    new_lo = lo if not 0 <= bottom < m else values[m - 1 - bottom]
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


@dataclass
class _Pass:
    """One bracketing pass: masks hold ``S > hi``; counts; the in-bracket scores."""

    above: int
    inside: int
    values: list[Tensor] | None
    #: Per part, the flat indices (ascending) of ``values``: gathered by the CPU's blocked
    #: pass, where the masks are then finished by writing those few entries alone.
    index: list[Tensor] | None = None


#: The CPU's bracket pass compares blocks of this many scores (256 KiB of fp32): a block's
#: second compare reads it from cache, so the pass costs about one read of the scores, not two
#: plus a scores-sized temporary (~50 vs ~105 ms over BERT-base's 85M scores on 2 cores).
CPU_BLOCK = 1 << 16


def _bracket_pass(parts: Sequence[Tensor], masks: Sequence[Tensor], lo: float, hi: float,
                  extract: bool, limit: float = BAND_LIMIT) -> _Pass:
    views = [(_np_view(p), _np_mask_view(m)) for p, m in zip(parts, masks)]
    if all(a is not None and mv is not None for a, mv in views):
        # a bracket of one value needs no values, but its few indices (if few) finish the
        # masks without another pass
        return _np_bracket_pass(views, lo, hi, limit if extract else min(limit, BAND_LIMIT))
    above = inside = 0
    values: list[Tensor] | None = [] if extract else None
    for p, m in zip(parts, masks):
        flat = p.detach().reshape(-1)
        torch.gt(flat, hi, out=m.view(-1))
        flags = (flat > lo) ^ m.view(-1)
        above += int(torch.count_nonzero(m))
        inside += int(torch.count_nonzero(flags))
        if values is not None and inside > limit:
            values = None  # too many to gather: count only, narrow next round
        elif values is not None:
            values.append(flat[flags])
    return _Pass(above, inside, values)


def _np_bracket_pass(views: Sequence[tuple], lo: float, hi: float, limit: float) -> _Pass:
    """:func:`_bracket_pass` on numpy views, block by block, gathering the in-bracket
    indices while they number at most ``limit`` (then counting only)."""
    dtype = views[0][0].dtype.type
    lo_, hi_ = dtype(lo), dtype(hi)
    flags = np.empty(min(CPU_BLOCK, max(a.size for a, _ in views)), dtype=np.bool_)
    above = inside = 0
    index: list[list] | None = []
    for a, mv in views:
        found: list = []
        for start in range(0, a.size, CPU_BLOCK):
            x, m = a[start:start + CPU_BLOCK], mv[start:start + CPU_BLOCK]
            f = flags[:x.size]
            np.greater(x, hi_, out=m)
            np.greater(x, lo_, out=f)
            np.not_equal(f, m, out=f)  # lo < S <= hi
            above += int(np.count_nonzero(m))
            if index is None:
                inside += int(np.count_nonzero(f))
                continue
            at = np.flatnonzero(f)
            inside += at.size
            if inside > limit:
                index = None  # too many to gather: count only, narrow next round
            elif at.size:
                found.append(at + start if start else at)
        if index is not None:
            index.append(found)
    if index is None:
        return _Pass(above, inside, None)
    flat_index = [torch.from_numpy(np.concatenate(f) if f else np.empty(0, dtype=np.int64))
                  for f in index]
    values = [torch.from_numpy(a[i.numpy()]) for (a, _), i in zip(views, flat_index)]
    return _Pass(above, inside, values, flat_index)


def _np_mask_view(m: Tensor):
    if np is not None and m.device.type == "cpu" and m.is_contiguous():
        return m.view(-1).numpy()
    return None


def _write_mask(p: Tensor, m: Tensor, value: float, inclusive: bool) -> None:
    """m = S >= value (inclusive) or S > value."""
    a, mv = _np_view(p), _np_mask_view(m)
    if a is not None and mv is not None:
        (np.greater_equal if inclusive else np.greater)(a, a.dtype.type(value), out=mv)
    else:
        (torch.ge if inclusive else torch.gt)(p.detach(), value, out=m)


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
        return masks, _threshold(math.inf, 0, 0, parts[0]), hint
    dtype = parts[0].dtype
    lo, hi = -math.inf, math.inf  # invariant: above(hi) < k <= above(lo): answer in (lo, hi]
    c_lo, c_hi = n, 0
    attempt = None
    if hint is not None and hint.reliable and math.isfinite(hint.value):
        attempt = (_to_dtype(hint.value - hint.delta, dtype),
                   _to_dtype(hint.value + hint.delta, dtype))
    limit = min(BAND_LIMIT, max(BAND_MIN, n // 100))
    result: _Pass | None = None
    for _ in range(_MAX_ROUNDS):
        band_n = c_lo - c_hi
        if attempt is None:
            if lo == _next_down(hi, dtype):
                attempt = (lo, hi)
            elif band_n > min(NARROW_MIN, limit):
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
                          limit=math.inf if stuck else limit)
        if r.above >= k:             # the answer is above a_hi
            lo, c_lo = a_hi, r.above
        elif r.above + r.inside < k:  # the answer is at or below a_lo
            hi, c_hi = a_lo, r.above + r.inside
        else:
            lo, hi, c_lo, c_hi = a_lo, a_hi, r.above + r.inside, r.above
            if single or r.values is not None:
                result = r
                break
    if result is None:  # pragma: no cover - the bracket shrinks geometrically; a safety net
        result = _bracket_pass(parts, masks, lo, hi, extract=True, limit=math.inf)
    return _finish(parts, masks, k, lo, hi, result, hint, dtype, n)


def _finish(parts: Sequence[Tensor], masks: Sequence[Tensor], k: int, lo: float, hi: float,
            r: _Pass, hint: SelectionHint | None, dtype: torch.dtype, n: int
            ) -> tuple[list[Tensor], TopVThreshold, SelectionHint]:
    need = k - r.above  # how many in-bracket scores to keep
    if not 0 < need <= r.inside:  # only where some scores do not rank: NaN (or -inf)
        raise ValueError(f"exact Top-v cannot keep {k} of {n} scores: fewer than {k} are "
                         "above -inf and not NaN (the pruner stops a diverged run before "
                         "selecting; check the scores for NaN or -inf)")
    if r.index is not None and r.values is not None:  # the CPU's blocked pass gathered them
        value, ties = _keep_in_bracket(masks, r.values, r.index, need)
    elif r.values is None:  # every in-bracket score equals hi; masks already hold S > hi
        value, ties = hi, need
        if ties == r.inside:
            for p, m in zip(parts, masks):
                _write_mask(p, m, value, inclusive=True)
        else:  # keep only the first `ties` of the scores equal to the threshold
            _add_first_equal(parts, masks, value, ties)
    else:
        band = torch.cat(r.values)
        if band.dtype in (torch.float16, torch.bfloat16):
            band = band.float()  # exact: kthvalue lacks half kernels on some devices
        value = float(torch.kthvalue(band, band.numel() - need + 1).values)
        ties = need - int(torch.count_nonzero(band > value))
        tied = int(torch.count_nonzero(band == value))
        for p, m in zip(parts, masks):
            _write_mask(p, m, value, inclusive=ties == tied)
        if ties != tied:
            _add_first_equal(parts, masks, value, ties)
    # The next warm bracket gathers few scores (~0.1% of them, at least a few thousand); it is
    # used only while thresholds stay inside it, else the next call samples.
    inside = max(1, r.inside)
    target = max(4096, n // 1000)
    width = (hi - lo) if math.isfinite(hi - lo) else abs(value) + 1.0
    delta = 0.5 * width * min(4.0, max(0.25, target / inside))
    reliable = hint is None or not math.isfinite(hint.value) \
        or abs(value - hint.value) <= hint.delta
    return (list(masks), _threshold(value, ties, k, parts[0]),
            SelectionHint(value, max(delta, 1e-12), reliable))


def _keep_in_bracket(masks: Sequence[Tensor], values: Sequence[Tensor],
                     index: Sequence[Tensor], need: int) -> tuple[float, int]:
    """The threshold ``t`` (the ``need``-th largest in-bracket score) and how many of the
    scores equal to it are kept; the masks (holding S > hi) get the kept in-bracket entries:
    those above ``t`` and the first ties, lowest index first, part by part. Numpy on the few
    gathered scores: a handful of small torch ops cost more than the arithmetic."""
    vals = [v.numpy() for v in values]
    band = np.concatenate(vals) if len(vals) > 1 else vals[0]
    at = band.size - need
    value = np.partition(band, at)[at]  # a copy: the band's order is the index order
    ties = left = need - int(np.count_nonzero(band > value))
    for m, v, i in zip(masks, vals, index):
        keep = v > value
        if left:
            equal = np.flatnonzero(v == value)[:left]
            keep[equal] = True
            left -= equal.size
        m.view(-1).numpy()[i.numpy()[keep]] = True
    return float(value), ties


def _threshold(value: float, ties: int, k: int, like: Tensor) -> TopVThreshold:
    return TopVThreshold(torch.tensor(value, dtype=like.dtype), torch.tensor(ties), k)


# --- accelerators: exact Top-v with device operations only -----------------------------------

#: Ties are counted per block of this many scores (a power of two; a block divides the row),
#: so only the one block where the kept ties end needs a running count: a running count over
#: the whole row writes 4 bytes per score and reads them back.
TIE_BLOCK = 4096


def topv_rows(rows: Tensor, k: int, out: Tensor | None = None) -> Tensor:
    """Masks keeping exactly the ``k`` largest scores of each row of ``rows`` (2-D), ties kept
    lowest index first: what :func:`topv_masks` keeps for each row alone.

    No value is read back to the host: ``torch.topk`` gives each row's k-th largest value ``t``,
    and the mask is ``S > t`` plus the first ``k - #(S > t)`` scores equal to ``t``
    (:func:`_mask_at`). Three passes over the scores, all queued on their device.
    """
    n = rows.shape[-1]
    if out is None:
        out = torch.empty(rows.shape, dtype=torch.bool, device=rows.device)
    if k <= 0 or k >= n:
        return out.fill_(k > 0)
    x = rows.detach()
    # The k-th largest is the (n - k + 1)-th smallest: ask topk for the shorter list (it writes
    # 12 bytes per value it returns; early in a schedule k is nearly n).
    if 2 * k <= n:
        top = torch.topk(x, k, dim=-1, sorted=False).values
        kth = top.amin(dim=-1, keepdim=True)
        per_block = None
        above = (top > kth).sum(dim=-1, keepdim=True)  # every score above t is in the top k
    else:
        bottom = torch.topk(x, n - k + 1, dim=-1, largest=False, sorted=False).values
        kth = bottom.amax(dim=-1, keepdim=True)
        per_block = _ties_per_block(x, kth)
        below = (bottom < kth).sum(dim=-1, keepdim=True)  # every score below t is in these
        above = n - below - per_block.sum(dim=-1, keepdim=True)
    return _mask_at(x, kth, k - above, out, per_block)


def _block_size(n: int) -> int:
    """The tie block of a row of ``n``: TIE_BLOCK or the largest power of two dividing ``n``
    below it; the whole row where that is short (blocks of a few scores cost more than they
    save)."""
    block = math.gcd(n, TIE_BLOCK)
    return block if n > TIE_BLOCK and block >= TIE_BLOCK // 16 else n


def _ties_per_block(x: Tensor, value: Tensor) -> Tensor:
    """How many elements of each block of each row of ``x`` equal ``value`` (..., blocks)."""
    n = x.shape[-1]
    block = _block_size(n)
    equal = x == value
    return equal.view(*x.shape[:-1], n // block, block).sum(dim=-1, dtype=_index_dtype(n))


def _index_dtype(n: int) -> torch.dtype:
    return torch.int32 if n < 2**31 else torch.int64


def _mask_at(x: Tensor, value: Tensor, ties: Tensor, out: Tensor,
             per_block: Tensor | None = None) -> Tensor:
    """``out`` = ``x > value`` plus the first ``ties`` elements equal to ``value``, per row of
    ``x`` (``value`` and ``ties`` broadcast over the last dimension; ``per_block``: the
    :func:`_ties_per_block` of ``x`` and ``value`` where the caller has it); device operations
    only.

    The kept ties fill whole blocks up to one: blocks before it compare ``x >= value``, blocks
    after it ``x > value`` (``x >= next float up``), so one compare pass writes the mask; the
    boundary block alone is redone with a running count of its ties.
    """
    lead, n = x.shape[:-1], x.shape[-1]
    size = _block_size(n)
    if size == n:  # a short row: one running count over it is the fewest passes
        return _above_or_first_ties(x, value, ties, out)
    blocks = n // size
    if per_block is None:
        per_block = _ties_per_block(x, value)
    through = per_block.cumsum(dim=-1, dtype=per_block.dtype)  # ties up to each block's end
    filled = through <= ties  # blocks whose ties are all kept: a prefix of the row
    edge = filled.sum(dim=-1, keepdim=True).clamp_(max=blocks - 1)  # the boundary block
    room = ties - (through - per_block).gather(-1, edge)  # ties still to keep as it starts
    wide = value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    strictly = torch.nextafter(wide, torch.full_like(wide, math.inf))  # x > t as x >= this
    # A device that flushes denormals reads the float after 0 as 0: the next one up it tells
    # apart from 0 is the smallest normal
    strictly = strictly.masked_fill_(strictly <= wide, torch.finfo(wide.dtype).tiny)
    strictly = strictly.masked_fill_(wide == math.inf, math.nan)  # nothing is above +Inf
    cut = torch.where(filled, wide, strictly).unsqueeze(-1)  # (..., blocks, 1)
    grid = out.view(*lead, blocks, size)
    torch.ge(x.view(*lead, blocks, size), cut, out=grid)
    at = edge.unsqueeze(-1).expand(*lead, 1, size)
    xs = x.view(*lead, blocks, size).gather(-2, at)  # (..., 1, size)
    keep = torch.empty_like(xs, dtype=torch.bool)
    grid.scatter_(-2, at, _above_or_first_ties(xs, value.unsqueeze(-1), room.unsqueeze(-1), keep))
    return out


def _above_or_first_ties(x: Tensor, value: Tensor, ties: Tensor, out: Tensor) -> Tensor:
    """``out`` = ``x > value`` plus the first ``ties`` elements equal to ``value`` along the
    last dimension, by a running count of the ties."""
    equal = x == value
    first = equal.logical_and_(equal.cumsum(dim=-1, dtype=_index_dtype(x.shape[-1])) <= ties)
    return torch.logical_or(x > value, first, out=out)


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


# --- sharded Top-v: radix select over order-preserving integer keys ---------------------------
#
# When the scores are sharded across ranks (ZeRO-3), no rank holds a whole layer. The k-th
# largest score is then found digit by digit, most significant first: each rank histograms the
# next 8 bits of its candidate keys, one all-reduce of the small histograms tells every rank
# which bin holds the answer, and the candidates shrink to that bin. 32-bit scores take 4
# rounds, 16-bit ones 2; each moves 257 counts per selection group, never the scores. Every
# decision is a tensor on the scores' device, so nothing waits on the host; on the CPU the
# candidates are also compacted after each digit (and first bracketed by a sample), which is
# faster there.

_RADIX_BITS = 8
_BINS = 1 << _RADIX_BITS
_KEY_DTYPES = {torch.float32: (torch.int32, 32), torch.bfloat16: (torch.int16, 16),
               torch.float16: (torch.int16, 16)}


@dataclass(frozen=True)
class TopVThreshold:
    """One tensor's share of a Top-v: keep ``S > value`` plus the first ``ties_kept`` scores
    equal to ``value`` (flat order). ``value`` and ``ties_kept`` are 0-dim tensors on the
    scores' device (+inf and 0 when nothing is kept); ``k`` is the group's count."""

    value: Tensor
    ties_kept: Tensor
    k: int


def float_keys(x: Tensor) -> Tensor:
    """Signed integer keys ordered like the float values of ``x`` (flat; -0.0 taken as 0.0).

    Non-negative floats already order like their bit patterns; negative ones order backwards,
    so their magnitude bits are flipped."""
    if x.dtype not in _KEY_DTYPES:
        raise TypeError(f"sharded Top-v supports float32, bfloat16 and float16 scores, got "
                        f"{x.dtype}")
    int_dtype, bits = _KEY_DTYPES[x.dtype]
    i = (x.detach().reshape(-1) + 0.0).view(int_dtype)  # + 0.0 turns -0.0 into +0.0
    return torch.where(i < 0, i ^ ((1 << (bits - 1)) - 1), i)


def keys_to_float(keys: Tensor, dtype: torch.dtype) -> Tensor:
    """The inverse of :func:`float_keys`, elementwise, for int64 ``keys`` of ``dtype``."""
    int_dtype, bits = _KEY_DTYPES[dtype]
    i = torch.where(keys < 0, keys ^ ((1 << (bits - 1)) - 1), keys)
    return i.to(int_dtype).view(dtype)


def key_to_float(key: int, dtype: torch.dtype) -> float:
    """The float value of ``dtype`` whose key (:func:`float_keys`) is ``key``."""
    return float(keys_to_float(torch.tensor([key]), dtype)[0])


def topv_thresholds(parts: Sequence[Tensor], groups: Sequence[Sequence[int]],
                    ks: Sequence[int], all_reduce: Callable[[Tensor], None] | None = None,
                    totals: Sequence[int] | None = None, sync_free: bool | None = None
                    ) -> list[TopVThreshold]:
    """Exact Top-v thresholds when each part may be one rank's shard of a tensor.

    ``parts[i]`` is this rank's (flat) share of tensor ``i``; ``groups`` lists which tensors are
    ranked together (one per layer: local Top-v; all of them: global) and ``ks[g]`` how many of
    group ``g``'s scores, over all ranks, to keep. ``all_reduce`` sums a tensor in place across
    ranks (None: one process holds everything); ``totals[g]``, group ``g``'s size over all
    ranks, saves one all-reduce when the caller knows it. Returns one threshold per tensor
    (:func:`mask_from_threshold` turns it into that tensor's mask; tensors of a group are
    tie-broken in group order), which is bitwise what :func:`topv_masks` keeps on the gathered
    tensors. Every rank gets the same answer. ``sync_free`` (default: off the CPU) keeps every
    decision on the device, so no value is read back and only the all-reduces communicate.
    """
    reduce = all_reduce or (lambda t: None)
    dtypes = {p.dtype for p in parts}
    if len(dtypes) > 1:
        raise TypeError(f"all score tensors must share one dtype, got {sorted(map(str, dtypes))}")
    if not parts:
        return []
    dtype, device = parts[0].dtype, parts[0].device
    bits = _KEY_DTYPES[dtype][1] if dtype in _KEY_DTYPES else 32
    compact = not (use_device_path(parts[0]) if sync_free is None else sync_free)
    n_groups = len(groups)
    # Every rank must make the same collective calls: all groups advance together.
    if totals is None:  # read back: pass totals where that matters
        sizes = torch.tensor([p.numel() for p in parts], dtype=torch.int64, device=device)
        reduce(sizes)
        totals = [int(sum(int(sizes[i]) for i in g)) for g in groups]
    ks = [min(max(0, int(k)), n) for k, n in zip(ks, totals)]
    k_t = torch.tensor(ks, dtype=torch.int64, device=device)
    if compact:
        above_list, candidates = _bracket_prefilter(parts, groups, ks, totals, reduce)
        above = torch.tensor(above_list, dtype=torch.int64, device=device)
        candidates = [float_keys(c) for c in candidates]
        alive: list[Tensor] = []  # compact candidates are cut instead of masked
    else:
        above = torch.zeros(n_groups, dtype=torch.int64, device=device)
        candidates = [float_keys(p) for p in parts]
        alive = [torch.ones_like(c, dtype=torch.bool) for c in candidates]
    remaining = k_t - above  # rank of the answer among the candidates, from the top
    prefix = torch.zeros(n_groups, dtype=torch.int64, device=device)
    group_of = [g for g, members in enumerate(groups) for _ in members]
    order = [i for members in groups for i in members]
    for shift in range(bits - _RADIX_BITS, -1, -_RADIX_BITS):
        hist = torch.zeros(n_groups, _BINS + 1, dtype=torch.int64, device=device)
        digits: dict[int, Tensor] = {}
        for g, i in zip(group_of, order):
            d = (candidates[i] >> shift) & (_BINS - 1)
            if shift == bits - _RADIX_BITS:  # the sign digit: negatives first
                d = d ^ (_BINS >> 1)
            digits[i] = d = d.long()
            if compact:
                hist[g, :_BINS] += torch.bincount(d, minlength=_BINS)
            else:  # dead candidates count in the spare bin; fixed shapes, no host read
                d = torch.where(alive[i], d, _BINS)
                hist[g].scatter_add_(0, d, torch.ones_like(d))
        reduce(hist)
        from_top = hist[:, :_BINS].flip(1).cumsum(1)  # scores in this bin or above, per group
        b_rev = torch.searchsorted(from_top, remaining.unsqueeze(1)).clamp_(max=_BINS - 1)
        skipped = torch.where(b_rev > 0, from_top.gather(1, (b_rev - 1).clamp(min=0)), 0)
        digit = (_BINS - 1) - b_rev.squeeze(1)
        above += skipped.squeeze(1)
        remaining -= skipped.squeeze(1)
        prefix = (prefix << _RADIX_BITS) | digit
        for g, i in zip(group_of, order):
            chosen = digits[i] == digit[g]
            if compact:
                candidates[i] = candidates[i][chosen]
            else:
                alive[i] = alive[i].logical_and_(chosen)
    # Candidates left are the scores equal to the answer; keep the first ones in group order.
    tied = torch.stack([c.new_tensor(c.numel(), dtype=torch.int64) if compact
                        else alive[i].sum(dtype=torch.int64)
                        for i, c in enumerate(candidates)])
    reduce(tied)
    # the flipped sign digit made the prefix the key offset by 2^(bits-1)
    values = keys_to_float(prefix - (1 << (bits - 1)), dtype)
    values = torch.where(k_t > 0, values, torch.tensor(math.inf, dtype=dtype, device=device))
    out: list[TopVThreshold | None] = [None] * len(parts)
    for g, members in enumerate(groups):
        need = remaining[g]  # ties to keep in this group, first members first
        for i in members:
            kept = torch.minimum(need, tied[i]).clamp_(min=0)
            need = need - kept
            out[i] = TopVThreshold(values[g], kept, ks[g])
    return out  # type: ignore[return-value]


def _bracket_prefilter(parts: Sequence[Tensor], groups: Sequence[Sequence[int]],
                       ks: Sequence[int], totals: Sequence[int],
                       reduce: Callable[[Tensor], None]) -> tuple[list[int], list[Tensor]]:
    """Shrink the radix select's input to a bracket around each group's answer (CPU only: it
    reads its decisions back, and extracts the in-bracket scores).

    Each rank samples its shards and proposes a bracket (lo, hi] around the k-th largest score
    (sample quantile +- 4 binomial standard deviations); the ranks average their proposals
    (one all-reduce), count the scores above and inside (one more), and a group whose bracket
    holds its answer hands only the in-bracket scores to the radix select, with the count above
    it. A group whose bracket missed (unlucky sample, or shards unlike each other) keeps all its
    scores: slower, never wrong. Returns (scores known above the answer, scores to select from).
    """
    dtype = parts[0].dtype if parts else torch.float32
    bounds = torch.zeros(len(groups), 3, dtype=torch.float64)
    for g, members in enumerate(groups):
        pieces = [parts[i].detach().reshape(-1) for i in members]
        n_local = sum(p.numel() for p in pieces)
        if not 0 < ks[g] < totals[g] or n_local == 0:
            continue
        stride = max(1, n_local // SAMPLE_SIZE)
        sample = torch.cat([p[::stride] for p in pieces])
        lo, hi = _narrow(sample, ks[g] / totals[g], -math.inf, math.inf, dtype)
        bounds[g] = torch.tensor([lo, hi, 1.0], dtype=torch.float64)
    finite = torch.isfinite(bounds)
    counted = torch.where(finite, bounds, torch.zeros_like(bounds))
    flags = (~finite[:, :2]).to(torch.float64)  # an infinite end anywhere wins
    packed = torch.cat([counted, flags], dim=1)
    reduce(packed)
    counts = torch.zeros(len(groups), 2, dtype=torch.int64)
    survivors = [p.detach().reshape(-1) for p in parts]
    inside: dict[int, Tensor] = {}  # in-bracket scores, extracted by the counting pass
    for g, members in enumerate(groups):
        voters = packed[g, 2].item()
        if voters == 0:
            continue
        lo = -math.inf if packed[g, 3] > 0 else packed[g, 0].item() / voters
        hi = math.inf if packed[g, 4] > 0 else packed[g, 1].item() / voters
        lo, hi = _to_dtype(lo, dtype), _to_dtype(hi, dtype)
        if lo >= hi:  # the sample ties around the answer: bracket that value alone
            lo = _next_down(hi, dtype)
        for i in members:
            p = survivors[i]
            above_hi = p > hi
            inside[i] = p[(p > lo) ^ above_hi]  # lo < S <= hi, as lo < hi
            counts[g, 0] += int(torch.count_nonzero(above_hi))
            counts[g, 1] += inside[i].numel()
    reduce(counts)
    above = [0] * len(groups)
    for g, members in enumerate(groups):
        c_above, c_inside = int(counts[g, 0]), int(counts[g, 1])
        if members[0] not in inside or not c_above < ks[g] <= c_above + c_inside:
            continue  # no bracket, or it missed: select from every score of the group
        above[g] = c_above
        for i in members:
            survivors[i] = inside[i]
    return above, survivors


def mask_from_threshold(importance: Tensor, threshold: TopVThreshold) -> Tensor:
    """The mask of one whole tensor from its :func:`topv_thresholds` entry (device operations
    only: a ZeRO-3 forward rebuilds it from the gathered scores)."""
    flat = importance.detach().reshape(1, -1)
    value = threshold.value.to(flat.device, flat.dtype).reshape(1, 1)
    ties = threshold.ties_kept.to(flat.device).reshape(1, 1)
    mask = torch.empty(flat.shape, dtype=torch.bool, device=flat.device)
    _mask_at(flat, value, ties, mask)
    return mask.view(importance.shape)
