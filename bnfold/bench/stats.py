"""Statistics of a benchmark: closed form, in memory bounded by a chunk whatever the number of rounds.

A benchmark's unit is the **session** (see :mod:`bnfold.bench.measure`): what changes from one session to the
next is often larger than what changes from one run to the next inside a session. The statistics are therefore
two-stage:

1. **Within a session**, one robust number: a model's median latency; for a ratio, the median per-round log
   ratio in each stratum of rounds that ran in the same order (the two models always held the same positions
   there), averaged over the strata, so position effects cancel and preempted runs do not count.
2. **Across sessions**, the session numbers are the sample: the estimate is their mean (on the log scale) and
   its 95% interval is Student's t with S-1 degrees of freedom (S sessions). The spread of the session numbers
   contains both the session-to-session variation and the noise of each session's median, so the interval
   needs no resampling and cannot be narrower than the sessions disagree. With one session the interval is the
   distribution-free order-statistic interval of the median (rounds only: it does not see the session level).

The within-session noise of a session's ratio is also estimated in closed form (MAD of the per-round log ratios,
``pi/2 * sigma^2 / n`` per stratum median); it separates the part of the interval that more rounds would shrink
from the part only more sessions shrink (``spread_halfwidth``): when the latter alone is wider than the minimum
effect asked for, the verdict is ``underpowered`` rather than "no difference".

Order statistics (medians, percentiles) of large samples are exact and computed in chunks: a histogram of the
values narrows the range holding the wanted rank until few enough values remain to sort. Nothing is ever
indexed by (draws x sessions x rounds), so memory stays below ~60 MB for any number of rounds
(``tests/test_bench_stats.py`` measures it with tracemalloc).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np

#: a ratio is named a difference only when its interval excludes 1 and it is beyond 1 +- MIN_EFFECT
MIN_EFFECT = 0.02
_Z975 = 1.959963984540054
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
#: values processed at once by the chunked order statistics, and the count below which values are just sorted
CHUNK = 1 << 20
EXACT = 1 << 18
_BINS = 1024


# ------------------------------------------------------------------------------------------------ quantiles
def t975(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError("t needs at least one degree of freedom")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


Source = Callable[[], Iterable[np.ndarray]]


def _chunked(*arrays: np.ndarray) -> Source:
    """A source yielding the values of ``arrays`` in chunks of at most CHUNK (views, no copies)."""
    def gen() -> Iterator[np.ndarray]:
        for a in arrays:
            for i in range(0, a.size, CHUNK):
                yield a[i:i + CHUNK]
    return gen


def order_stats(source: Source, ranks) -> list[float]:
    """The values of 0-based ``ranks`` in the sorted sequence of everything ``source()`` yields (in chunks),
    exactly, holding at most a chunk and EXACT values at a time."""
    n, lo, hi, small = 0, math.inf, -math.inf, []
    for c in source():
        if c.size:
            n += c.size
            lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
            if n <= EXACT:
                small.append(c)
    if n <= EXACT:  # few values: sort them
        vals = np.sort(np.concatenate(small)) if small else np.empty(0)
        if any(not 0 <= r < n for r in ranks):
            raise ValueError(f"rank out of {n} values")
        return [float(vals[r]) for r in ranks]
    if any(not 0 <= r < n for r in ranks):
        raise ValueError(f"rank out of {n} values")
    # every wanted rank lies in a half-open range [a, b). One pass over the chunks counts the values below a
    # exactly and, per range: collects its values while they are at most EXACT (then sorts them); counts its
    # distinct values when the range spans only a few thousand floats; else builds a histogram, from which the
    # range narrows ~340-fold to the rank's bin and its two neighbours (so that rounding never loses the rank)
    ranges = {r: (lo, float(np.nextafter(hi, math.inf))) for r in ranks}
    found: dict[int, float] = {}
    while len(found) < len(ranges):
        groups: dict[tuple, list[int]] = {}
        for r, key in ranges.items():
            if r not in found:
                groups.setdefault(key, []).append(r)
        few = {key: key[1] - key[0] <= 4096 * float(np.spacing(max(abs(key[0]), abs(key[1])))) for key in groups}
        below = dict.fromkeys(groups, 0)
        held = dict.fromkeys(groups, 0)
        hists = {key: np.zeros(_BINS, dtype=np.int64) for key in groups}
        parts: dict[tuple, list[np.ndarray] | None] = {key: [] for key in groups}
        distinct: dict[tuple, dict[float, int]] = {key: {} for key in groups if few[key]}
        for c in source():
            for (a, b) in groups:
                below[a, b] += int(np.count_nonzero(c < a))
                sel = c[(c >= a) & (c < b)]
                held[a, b] += sel.size
                if parts[a, b] is not None:  # kept while they are few: then this pass finishes the range
                    parts[a, b] = parts[a, b] + [sel] if held[a, b] <= EXACT else None
                if few[a, b]:
                    counts = distinct[a, b]
                    for x, m in zip(*(v.tolist() for v in np.unique(sel, return_counts=True))):
                        counts[x] = counts.get(x, 0) + m
                    continue
                if math.isfinite(b - a):
                    idx = ((sel - a) / (b - a) * _BINS).astype(np.int64)
                else:  # a range wider than the largest float: halves
                    idx = ((sel * 0.5 - a * 0.5) / (b * 0.5 - a * 0.5) * _BINS).astype(np.int64)
                hists[a, b] += np.bincount(np.clip(idx, 0, _BINS - 1), minlength=_BINS)
        for key, rs in groups.items():
            a, b = key
            if held[key] <= EXACT:
                vals = np.sort(np.concatenate(parts[key]))
                for r in rs:
                    found[r] = float(vals[r - below[key]])
            elif few[key]:
                for r in rs:
                    acc = below[key]
                    for x in sorted(distinct[key]):
                        acc += distinct[key][x]
                        if r < acc:
                            found[r] = x
                            break
            else:
                cum = np.cumsum(hists[key])
                w = (b - a) / _BINS if math.isfinite(b - a) else 2 * ((b * 0.5 - a * 0.5) / _BINS)
                for r in rs:
                    j = int(np.searchsorted(cum, r - below[key], side="right"))
                    ranges[r] = (max(a, a + (j - 1) * w), min(b, a + (j + 2) * w))
    return [found[r] for r in ranks]


def _quantiles(source: Source, n: int, qs) -> list[float]:
    """``np.percentile(x, 100 q)`` (linear interpolation) for each q of the n values of ``source``."""
    pos = [q * (n - 1) for q in qs]
    ranks = sorted({r for p in pos for r in (math.floor(p), math.ceil(p))})
    v = dict(zip(ranks, order_stats(source, ranks)))
    return [v[math.floor(p)] + (v[math.ceil(p)] - v[math.floor(p)]) * (p - math.floor(p)) for p in pos]


def _quantile(source: Source, n: int, q: float) -> float:
    return _quantiles(source, n, (q,))[0]


def _median_ranks(n: int) -> tuple[int, int]:
    """0-based ranks of the distribution-free ~95% interval of the median of n values (order statistics)."""
    half = _Z975 * math.sqrt(n) / 2
    return max(0, math.floor(n / 2 - half) - 1), min(n - 1, math.ceil(n / 2 + half))


# ------------------------------------------------------------------------------------------------ sessions
def _as_sessions(x) -> list[np.ndarray]:
    """A list of per-session float64 arrays (views where the input allows); a flat sequence is one session."""
    if len(x) == 0:
        raise ValueError("no samples")
    if np.ndim(x[0]) == 0:
        x = [x]
    out = [np.asarray(s, dtype=np.float64).reshape(-1) for s in x]
    if any(s.size == 0 for s in out):
        raise ValueError("a session without samples")
    return out


def _mean_interval(values: np.ndarray) -> tuple[float, float, float]:
    """(mean, t half-width, standard error) of session values: Student's t with S-1 degrees of freedom."""
    s = values.size
    m = float(values.mean())
    if s < 2:
        return m, 0.0, 0.0
    se = float(values.std(ddof=1)) / math.sqrt(s)
    return m, t975(s - 1) * se, se


def summarize(samples_ms) -> dict:
    """p50/p90/p99/mean/std/min of the pooled samples and a 95% interval of the median: Student's t over the
    per-session log medians (one session: the order-statistic interval of its median). ``samples_ms`` is a
    list of per-session sample sequences (a flat sequence is one session)."""
    sess = _as_sessions(samples_ms)
    if min(float(s.min()) for s in sess) <= 0:
        raise ValueError("latencies must be positive")
    n = sum(s.size for s in sess)
    pooled = _chunked(*sess)
    p50, p90, p99 = _quantiles(pooled, n, (0.5, 0.9, 0.99))
    shift = float(sess[0][0])
    s1 = s2 = 0.0
    for c in pooled():
        d = c - shift
        s1 += float(d.sum())
        s2 += float(np.dot(d, d))
    mean = shift + s1 / n
    std = math.sqrt(max(0.0, (s2 - s1 * s1 / n) / (n - 1))) if n > 1 else 0.0
    medians = [_quantile(_chunked(s), s.size, 0.5) for s in sess]
    if len(sess) == 1:
        lo_r, hi_r = _median_ranks(n)
        ci = order_stats(pooled, [lo_r, hi_r])
    else:
        m, h, _ = _mean_interval(np.log(medians))
        ci = [math.exp(m - h), math.exp(m + h)]
    ci = [min(ci[0], p50), max(ci[1], p50)]
    return {
        "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": mean, "std_ms": std,
        "min_ms": min(float(s.min()) for s in sess), "ci95_ms": ci, "n": int(n), "sessions": len(sess),
        "session_p50_ms": medians, "session_spread": max(medians) / min(medians) - 1,
    }


def _strata(a: np.ndarray, b: np.ndarray, k: int, block: int) -> list[Source]:
    """Per stratum (the order a round ran in), a source of the per-round log ratios log(a) - log(b) of
    session ``k``: round r ran in order (k + r) mod ``block``; only whole cycles count."""
    m = a.size // block
    out = []
    for order in range(block):
        start = (order - k) % block
        va, vb = a[start:m * block:block], b[start:m * block:block]

        def gen(va=va, vb=vb):
            for i in range(0, va.size, CHUNK):
                yield np.log(va[i:i + CHUNK]) - np.log(vb[i:i + CHUNK])
        out.append(gen)
    return out


def _session_ratio(a: np.ndarray, b: np.ndarray, k: int, block: int) -> tuple[float, float]:
    """(estimate, within-session variance) of session k's log ratio: the mean over strata of each stratum's
    median log ratio, and the variance of that mean from the rounds' robust spread (MAD)."""
    m = a.size // block
    if m == 0:
        raise ValueError(f"a session of {a.size} rounds holds no whole cycle of {block}")
    n = m * block
    if n <= EXACT:  # the same numbers, at once
        x = np.roll((np.log(a[:n]) - np.log(b[:n])).reshape(m, block), k % block, axis=1)  # column = order
        med = np.median(x, axis=0)
        meds = [float(v) for v in med]
        mad = float(np.median(np.abs(x - med)))
    else:
        strata = _strata(a, b, k, block)
        meds = [_quantile(src, m, 0.5) for src in strata]

        def resid():
            for src, med in zip(strata, meds):
                for c in src():
                    yield np.abs(c - med)
        mad = _quantile(resid, n, 0.5)
    sigma2 = (1.4826 * mad) ** 2
    var = sigma2 * (math.pi / 2 if m > 2 else 1.0) / m / block  # block strata medians of m rounds, averaged
    return float(np.mean(meds)), var


def ratio_ci(a_ms, b_ms, *, block: int = 1) -> dict:
    """Ratio a/b with a 95% interval. ``a_ms`` and ``b_ms`` are per-session sample sequences timed side by
    side: session k of ``a`` and session k of ``b`` are a pair, and their samples are paired by round. ``block``
    is the length of the balanced order's cycle: round r of session k ran in the cycle's order (k + r) mod
    ``block`` (as :func:`bnfold.bench.measure.measure` runs them). Each session gives one estimate (the mean
    over orders of the median per-round log ratio); the ratio is the exp of their mean, the interval Student's t
    over them (one session: the rounds' noise alone, normal).

    Also returned: ``session_ratios``; ``within_ci95``, the interval the rounds alone would give (as if the
    sessions agreed); ``spread_halfwidth``, the half-width (as a fraction) the session-to-session spread alone
    leaves however many rounds each session had (``between_sd``: the session-to-session standard deviation of
    the log ratio beyond the rounds' noise; :func:`sessions_needed` turns it into a session count)."""
    a, b = _as_sessions(a_ms), _as_sessions(b_ms)
    if len(a) != len(b):
        raise ValueError(f"{len(a)} sessions against {len(b)}: a ratio needs paired sessions")
    est, var = [], []
    for k, (sa, sb) in enumerate(zip(a, b)):
        if sa.size != sb.size:
            raise ValueError("paired sessions need the same number of rounds")
        if float(sa.min()) <= 0 or float(sb.min()) <= 0:
            raise ValueError("latencies must be positive")
        e, v = _session_ratio(sa, sb, k, block)
        est.append(e)
        var.append(v)
    e, v = np.array(est), np.array(var)
    S = e.size
    within_se = math.sqrt(float(v.sum())) / S
    point = float(e.mean())
    if S >= 2:
        _, h, _ = _mean_interval(e)
        between_sd = math.sqrt(max(0.0, float(e.var(ddof=1)) - float(v.mean())))
        spread_h = t975(S - 1) * between_sd / math.sqrt(S)
    else:
        h, between_sd, spread_h = _Z975 * within_se, 0.0, 0.0
    wh = _Z975 * within_se
    return {"ratio": math.exp(point), "ci95": [math.exp(point - h), math.exp(point + h)],
            "session_ratios": [float(math.exp(x)) for x in e], "sessions": S, "block": block,
            "within_ci95": [math.exp(point - wh), math.exp(point + wh)],
            "between_sd": between_sd, "spread_halfwidth": math.expm1(spread_h)}


def sessions_needed(between_sd: float, min_effect: float = MIN_EFFECT, limit: int = 10 ** 6) -> int | None:
    """Sessions for which the session spread alone (``between_sd`` of the log ratio) keeps the 95% half-width
    below ``min_effect``; None when ``min_effect`` is 0."""
    target = math.log1p(min_effect)
    if target <= 0:
        return None
    s = 3
    while s < limit and t975(s - 1) * between_sd / math.sqrt(s) > target:
        s = max(s + 1, int(s * 1.1))
    return s


# ------------------------------------------------------------------------------------------------ verdicts
def judge(ratio: float, ci95, min_effect: float = MIN_EFFECT, spread_halfwidth: float | None = None) -> str:
    """'faster' / 'slower' when the interval excludes 1 and the ratio is beyond 1 -+ ``min_effect``;
    'underpowered' when neither and the session-to-session spread alone (``spread_halfwidth``, a fraction)
    keeps the interval wider than ``min_effect`` (more rounds cannot decide it, only more sessions); else
    'none'."""
    if ci95[1] < 1 and ratio < 1 - min_effect:
        return "faster"
    if ci95[0] > 1 and ratio > 1 + min_effect:
        return "slower"
    if spread_halfwidth is not None and min_effect > 0 and spread_halfwidth > min_effect:
        return "underpowered"
    return "none"


def describe(ratio: float, ci95, min_effect: float = MIN_EFFECT, spread_halfwidth: float | None = None,
             sessions: int | None = None) -> str:
    """The verdict in words: '6.1% faster (ratio 0.939 [0.915, 0.962])'; '1.9% faster, below the 2% you asked
    for (ratio ...)' when the interval excludes 1 but the ratio is within ``min_effect``; 'underpowered: ...'
    with the sessions it would take; else 'no measurable difference (ratio r, interval [lo, hi])'."""
    verdict = judge(ratio, ci95, min_effect, spread_halfwidth)
    nums = f"ratio {ratio:.3f} [{ci95[0]:.3f}, {ci95[1]:.3f}]"
    if verdict in ("faster", "slower"):
        pct = 100 * abs(1 - ratio)
        return f"{pct:.1f}% {verdict} ({nums})"
    if verdict == "underpowered":
        need = sessions_needed(math.log1p(spread_halfwidth) / t975(sessions - 1) * math.sqrt(sessions),
                               min_effect) if sessions and sessions >= 2 else None
        return (f"underpowered ({nums}): the session-to-session spread alone keeps the interval "
                f"+-{100 * spread_halfwidth:.1f}% wide, more than the {100 * min_effect:g}% asked for"
                + (f"; about {need} sessions would do (--sessions, or more --iters/--duration)" if need else ""))
    if ci95[1] < 1 or ci95[0] > 1:
        word = "faster" if ratio < 1 else "slower"
        return (f"{100 * abs(1 - ratio):.1f}% {word}, below the {100 * min_effect:g}% you asked for "
                f"(ratio {ratio:.3f}, interval [{ci95[0]:.3f}, {ci95[1]:.3f}])")
    return f"no measurable difference (ratio {ratio:.3f}, interval [{ci95[0]:.3f}, {ci95[1]:.3f}])"


# ------------------------------------------------------------------------------------------------ tests
def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return float(sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(max(k, 0), n + 1)))


def binomial_two_sided(k: int, n: int, p: float) -> float:
    """Two-sided binomial test of k successes in n at rate p: twice the smaller tail, at most 1."""
    upper = binomial_tail(k, n, p)
    lower = 1 - binomial_tail(k + 1, n, p)
    return min(1.0, 2 * min(upper, lower))


def sign_test(ratios) -> float:
    """Two-sided sign test of ratios against 1 (ties dropped)."""
    up = sum(r > 1 for r in ratios)
    down = sum(r < 1 for r in ratios)
    n = up + down
    if n == 0:
        return 1.0
    return min(1.0, 2 * binomial_tail(max(up, down), n, 0.5))
