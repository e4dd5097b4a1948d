"""Samplers over keyed Philox substreams (00-core 3.4-3.5; decisions 7, 8, 14).

Two layers, bit-identical by test:

* **Scalar references** on a :class:`Stream` (Python floats, ``math.*``, exactly the order of
  operations written in 00-core 3.5): ``uniform``, ``uniform2``, ``bernoulli``, ``normal``,
  ``gamma``, ``poisson``, ``gumbel_key``, ``ztp``. They are the oracle for tests and validators.
* **Vectorised kernels** (numba, ``engine.core._kernels``) over arrays of substreams
  ``(key, hi, lo)``: ``*_vec``. Each returns the values and the counters after the draw
  (``hi_after, lo_after``; the inputs are the ``before`` counters) and, where the budget varies,
  ``blocks`` and ``draws`` (uint64).

Lane policy (00-core 3.4): one uniform = one block, ``x0`` (``x1`` discarded); two uniforms = one
block, ``x0`` then ``x1``. ``u01`` is decision 14's (strictly inside (0, 1)).

Caps (decision 8; no unbounded loop). Reaching one raises :class:`ModelError`
``E_SAMPLER_ATTEMPTS_EXHAUSTED`` with the row indices; none is reachable in practice:

* Gamma (Marsaglia-Tsang): ``GAMMA_MAX_ATTEMPTS = 1000`` attempts per sample (each attempt
  rejects with probability < 0.05 for the shapes used, alpha >= 1 after the boost);
* Poisson inversion (lambda < 10): ``POISSON_MAX_ATTEMPTS = 1000`` uniforms, i.e. k <= 999
  (P(K > 999 | lambda < 10) < 1e-1500);
* Poisson PTRS (lambda >= 10): ``POISSON_MAX_ATTEMPTS = 1000`` attempts (acceptance > 0.85);
* ZTP (1A S4) has its own policy cap ``max_zero_attempts`` (``MAX_ZTP_ZERO_ATTEMPTS``, default
  64) whose exhaustion is an *outcome* reported per row (decision 18), not an error.

Invalid parameters (NaN/inf, pi outside [0, 1], alpha <= 0, lambda < 0 or > ``POISSON_LAMBDA_MAX``,
w < 0) raise ``E_SAMPLER_PARAM_INVALID``; a non-finite result raises ``E_SAMPLER_NONFINITE``.
States that have their own named code for a numeric failure (e.g. ``ERR_S2_NUMERIC_INVALID``)
check their parameters before calling a sampler.

Gumbel key of weight 0 is ``-inf`` (the candidate can never be selected) and still consumes its
one uniform, so every considered candidate has exactly one event with ``blocks 1, draws "1"``.

lgamma: the scalar PTRS uses CPython's ``math.lgamma``; the kernels use a re-implementation of
the same algorithm (``_kernels.lgamma_py``) because numba's ``math.lgamma`` calls glibc's
``lgamma``, which differs in the last bits.
"""

from __future__ import annotations

import math

import numpy as np

from engine.core import rng
from engine.core.errors import ModelError

GAMMA_MAX_ATTEMPTS = 1000
POISSON_MAX_ATTEMPTS = 1000
POISSON_INVERSION_LIMIT = 10.0  # lambda* (00-core 3.5): inversion below, PTRS at or above
POISSON_LAMBDA_MAX = float(2**50)  # keeps k exactly representable and inside int64
ZTP_MAX_ZERO_ATTEMPTS = 64
TAU = float.fromhex("0x1.921fb54442d18p+2")

E_ATTEMPTS = "E_SAMPLER_ATTEMPTS_EXHAUSTED"
E_PARAM = "E_SAMPLER_PARAM_INVALID"
E_NONFINITE = "E_SAMPLER_NONFINITE"

_ST_CODES = {1: E_PARAM, 2: E_ATTEMPTS, 3: E_NONFINITE}
_ST_TEXT = {
    1: "non-finite or out-of-domain sampler parameter",
    2: "rejection sampler reached its attempt cap (decision 8)",
    3: "sampler produced a non-finite value",
}


# ============================================================================================
# Scalar reference
# ============================================================================================
class Stream:
    """One keyed substream: key and 128-bit counter, plus cumulative ``blocks`` / ``draws`` counts."""

    __slots__ = ("key", "hi", "lo", "blocks", "draws")

    def __init__(self, key: int, hi: int, lo: int) -> None:
        self.key = int(key)
        self.hi = int(hi)
        self.lo = int(lo)
        self.blocks = 0
        self.draws = 0

    @property
    def counter(self) -> tuple[int, int]:
        return self.hi, self.lo

    def block(self) -> tuple[int, int]:
        """One Philox block at the current counter; the counter moves forward by one."""
        x = rng.philox2x64_10(self.key, self.hi, self.lo)
        self.hi, self.lo = rng.add128(self.hi, self.lo, 1)
        self.blocks += 1
        return x

    def uniform(self) -> float:
        """One uniform: one block, low lane ``x0``; ``x1`` discarded (1 block, 1 draw)."""
        x0, _ = self.block()
        self.draws += 1
        return rng.u01(x0)

    def uniform2(self) -> tuple[float, float]:
        """Two uniforms from one block: ``x0`` then ``x1`` (1 block, 2 draws)."""
        x0, x1 = self.block()
        self.draws += 2
        return rng.u01(x0), rng.u01(x1)


def _param_error(what: str, value, row) -> ModelError:
    return ModelError(E_PARAM, f"{what} = {value!r}", rows=None if row is None else [row],
                      detail={"parameter": what, "value": repr(value)})


def _exhausted(what: str, cap: int, row) -> ModelError:
    return ModelError(E_ATTEMPTS, f"{what}: {cap} attempts without acceptance (decision 8 cap)",
                      rows=None if row is None else [row], detail={"sampler": what, "cap": cap})


def bernoulli(s: Stream, pi: float, row=None) -> tuple[bool, float | None, bool]:
    """Hurdle Bernoulli: ``(is_multi, u, deterministic)``; pi in {0, 1} draws nothing (u None)."""
    pi = float(pi)
    if not math.isfinite(pi) or pi < 0.0 or pi > 1.0:
        raise _param_error("pi", pi, row)
    if pi == 0.0 or pi == 1.0:
        return pi == 1.0, None, True
    u = s.uniform()
    return u < pi, u, False


def normal(s: Stream) -> float:
    """Box-Muller, cosine only: ``sqrt(-2 ln u1) * cos(TAU u2)`` from one block (1 block, 2 draws)."""
    u1, u2 = s.uniform2()
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(TAU * u2)


def _gamma_mt(s: Stream, alpha: float, max_attempts: int, row) -> float:
    d = alpha - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    for _ in range(max_attempts):
        z = normal(s)
        x = 1.0 + c * z
        if x <= 0.0:
            continue  # no extra draw
        v = x * x * x  # two multiplications, not pow (00-core section 8 #12)
        u = s.uniform()
        if math.log(u) < 0.5 * (z * z) + d - d * v + d * math.log(v):  # strict < (section 8 #13)
            return d * v
    raise _exhausted("gamma", max_attempts, row)


def gamma(s: Stream, alpha: float, max_attempts: int = GAMMA_MAX_ATTEMPTS, row=None) -> float:
    """Gamma(alpha, 1): Marsaglia-Tsang; alpha < 1 as Gamma(alpha+1) * u^(1/alpha)."""
    alpha = float(alpha)
    if not math.isfinite(alpha) or not alpha > 0.0:
        raise _param_error("alpha", alpha, row)
    if alpha >= 1.0:
        g = _gamma_mt(s, alpha, max_attempts, row)
    else:
        g1 = _gamma_mt(s, alpha + 1.0, max_attempts, row)
        u = s.uniform()
        g = g1 * (u ** (1.0 / alpha))
    if not math.isfinite(g):
        raise ModelError(E_NONFINITE, f"gamma({alpha!r}) = {g!r}", rows=None if row is None else [row])
    return g


def poisson(s: Stream, lam: float, max_attempts: int = POISSON_MAX_ATTEMPTS, row=None) -> int:
    """Poisson(lam): product-of-uniforms inversion for lam < 10, textbook PTRS for lam >= 10 (decision 7)."""
    lam = float(lam)
    if not math.isfinite(lam) or lam < 0.0 or lam > POISSON_LAMBDA_MAX:
        raise _param_error("lambda", lam, row)
    if lam < POISSON_INVERSION_LIMIT:
        L = math.exp(-lam)
        p = 1.0
        k = 0
        for _ in range(max_attempts):
            p *= s.uniform()
            if p <= L:
                return k
            k += 1
        raise _exhausted("poisson_inversion", max_attempts, row)
    # PTRS (Hoermann 1993) as decision 7 writes it: one block (u, v) per attempt.
    slam = math.sqrt(lam)
    loglam = math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
    v_r = 0.9277 - 3.6224 / (b - 2.0)
    for _ in range(max_attempts):
        u, v = s.uniform2()
        U = u - 0.5
        us = 0.5 - abs(U)
        t = (2.0 * a / us + b) * U + lam + 0.43
        # t is -inf only when us == 0 (u rounds to exactly -0.5 + 0.5); that is k < 0: reject
        k = math.floor(t) if math.isfinite(t) else -1
        if us >= 0.07 and v <= v_r:
            return k
        if k < 0 or (us < 0.013 and v > us):
            continue
        if math.log(v * inv_alpha / (a / (us * us) + b)) <= -lam + k * loglam - math.lgamma(k + 1):
            return k
    raise _exhausted("poisson_ptrs", max_attempts, row)


def gumbel_key(s: Stream, w: float, row=None) -> tuple[float, float]:
    """Gumbel key ``ln w - ln(-ln u)`` from one uniform; ``(key, u)``. w == 0 -> -inf (still one draw)."""
    w = float(w)
    if math.isnan(w) or w < 0.0 or math.isinf(w):
        raise _param_error("w", w, row)
    u = s.uniform()
    if w == 0.0:
        return -math.inf, u
    return math.log(w) - math.log(-math.log(u)), u


def ztp(s: Stream, lam: float, max_zero_attempts: int = ZTP_MAX_ZERO_ATTEMPTS,
        max_attempts: int = POISSON_MAX_ATTEMPTS, row=None) -> tuple[int, list[dict], bool]:
    """Zero-truncated Poisson loop (1A S4): ``(k_final, attempts, exhausted)``.

    ``attempts`` lists one dict per Poisson attempt: ``attempt`` (1-based), ``k``, counters
    before/after, ``blocks``, ``draws``. ``exhausted`` is True (and ``k_final`` 0) when
    ``max_zero_attempts`` attempts all gave 0.
    """
    recs = []
    for a in range(1, max_zero_attempts + 1):
        bh, bl, b0, d0 = s.hi, s.lo, s.blocks, s.draws
        k = poisson(s, lam, max_attempts=max_attempts, row=row)
        recs.append({"attempt": a, "k": k, "before_hi": bh, "before_lo": bl, "after_hi": s.hi,
                     "after_lo": s.lo, "blocks": s.blocks - b0, "draws": s.draws - d0})
        if k >= 1:
            return k, recs, False
    return 0, recs, True


# ============================================================================================
# Vectorised kernels
# ============================================================================================
def _streams(key, hi, lo):
    """Equal-length, C-contiguous, writable uint64 arrays (one numba signature per kernel)."""
    key, hi, lo = np.broadcast_arrays(rng._u64(key), rng._u64(hi), rng._u64(lo))
    return tuple(np.require(a.ravel(), np.uint64, ["C", "W"]) for a in (key, hi, lo))


def _param(p, n: int) -> np.ndarray:
    return np.require(np.broadcast_to(np.asarray(p, dtype=np.float64), (n,)), np.float64, ["C", "W"])


def _check(status: np.ndarray, what: str, params: np.ndarray | None = None) -> None:
    """Raise ModelError for the first failing status code, listing the first offending rows."""
    if not status.any():
        return
    bad = np.flatnonzero(status)
    code = int(status[bad[0]])
    rows = bad[status[bad] == code][:10]
    detail = {"sampler": what, "rows_failed": int(bad.size)}
    if params is not None:
        detail["params"] = [repr(float(params[r])) for r in rows]
    raise ModelError(_ST_CODES[code], f"{what}: {_ST_TEXT[code]}", rows=[int(r) for r in rows], detail=detail)


def _k():
    return rng._k()


def uniform1_vec(key, hi, lo):
    """One uniform per stream (1 block, 1 draw, lane x0): ``(u, hi_after, lo_after)``."""
    key, hi, lo = _streams(key, hi, lo)
    n = key.shape[0]
    u = np.empty(n)
    hi_a = np.empty(n, np.uint64)
    lo_a = np.empty(n, np.uint64)
    _k().uniform1_kernel(key, hi, lo, u, hi_a, lo_a)
    return u, hi_a, lo_a


def uniform2_vec(key, hi, lo):
    """Two uniforms per stream from one block (1 block, 2 draws): ``(u0, u1, hi_after, lo_after)``."""
    key, hi, lo = _streams(key, hi, lo)
    n = key.shape[0]
    u0 = np.empty(n)
    u1 = np.empty(n)
    hi_a = np.empty(n, np.uint64)
    lo_a = np.empty(n, np.uint64)
    _k().uniform2_kernel(key, hi, lo, u0, u1, hi_a, lo_a)
    return u0, u1, hi_a, lo_a


def bernoulli_vec(key, hi, lo, pi) -> dict:
    """Hurdle Bernoulli per stream. Returns a dict of arrays: ``u`` (NaN where deterministic),
    ``is_multi``, ``deterministic``, ``hi_after``, ``lo_after``, ``blocks``, ``draws`` (uint64 0/1)."""
    key, hi, lo = _streams(key, hi, lo)
    n = key.shape[0]
    p = _param(pi, n)
    u = np.empty(n)
    is_multi = np.empty(n, np.bool_)
    det = np.empty(n, np.bool_)
    hi_a = np.empty(n, np.uint64)
    lo_a = np.empty(n, np.uint64)
    blocks = np.empty(n, np.uint64)
    draws = np.empty(n, np.uint64)
    status = np.zeros(n, np.int8)
    _k().bernoulli_kernel(key, hi, lo, p, u, is_multi, det, hi_a, lo_a, blocks, draws, status)
    _check(status, "bernoulli", p)
    return {"u": u, "is_multi": is_multi, "deterministic": det, "hi_after": hi_a, "lo_after": lo_a,
            "blocks": blocks, "draws": draws}


def normal_vec(key, hi, lo):
    """Box-Muller normal per stream: ``(z, hi_after, lo_after, blocks, draws)`` (always 1 block, 2 draws)."""
    key, hi, lo = _streams(key, hi, lo)
    n = key.shape[0]
    z = np.empty(n)
    hi_a = np.empty(n, np.uint64)
    lo_a = np.empty(n, np.uint64)
    _k().normal_kernel(key, hi, lo, z, hi_a, lo_a)
    return z, hi_a, lo_a, np.ones(n, np.uint64), np.full(n, 2, np.uint64)


def gamma_vec(key, hi, lo, alpha, max_attempts: int = GAMMA_MAX_ATTEMPTS):
    """Gamma(alpha, 1) per stream: ``(value, hi_after, lo_after, blocks, draws)``."""
    key, hi, lo = _streams(key, hi, lo)
    n = key.shape[0]
    a = _param(alpha, n)
    out = np.empty(n)
    hi_a = np.empty(n, np.uint64)
    lo_a = np.empty(n, np.uint64)
    blocks = np.empty(n, np.uint64)
    draws = np.empty(n, np.uint64)
    status = np.zeros(n, np.int8)
    _k().gamma_kernel(key, hi, lo, a, int(max_attempts), out, hi_a, lo_a, blocks, draws, status)
    _check(status, "gamma", a)
    return out, hi_a, lo_a, blocks, draws


def poisson_vec(key, hi, lo, lam, max_attempts: int = POISSON_MAX_ATTEMPTS):
    """Poisson(lam) per stream (inversion < 10, PTRS >= 10): ``(k int64, hi_after, lo_after, blocks, draws)``."""
    key, hi, lo = _streams(key, hi, lo)
    n = key.shape[0]
    lm = _param(lam, n)
    out = np.empty(n, np.int64)
    hi_a = np.empty(n, np.uint64)
    lo_a = np.empty(n, np.uint64)
    blocks = np.empty(n, np.uint64)
    draws = np.empty(n, np.uint64)
    status = np.zeros(n, np.int8)
    _k().poisson_kernel(key, hi, lo, lm, int(max_attempts), POISSON_LAMBDA_MAX, out, hi_a, lo_a,
                        blocks, draws, status)
    _check(status, "poisson", lm)
    return out, hi_a, lo_a, blocks, draws


def gumbel_key_vec(key, hi, lo, w):
    """Gumbel keys ``ln w - ln(-ln u)`` (1 block, 1 draw each): ``(g, u, hi_after, lo_after)``; w == 0 -> -inf."""
    key, hi, lo = _streams(key, hi, lo)
    n = key.shape[0]
    ww = _param(w, n)
    g = np.empty(n)
    u = np.empty(n)
    hi_a = np.empty(n, np.uint64)
    lo_a = np.empty(n, np.uint64)
    status = np.zeros(n, np.int8)
    _k().gumbel_kernel(key, hi, lo, ww, g, u, hi_a, lo_a, status)
    _check(status, "gumbel_key", ww)
    return g, u, hi_a, lo_a


def ztp_vec(key, hi, lo, lam, max_zero_attempts: int = ZTP_MAX_ZERO_ATTEMPTS,
            max_attempts: int = POISSON_MAX_ATTEMPTS) -> dict:
    """Zero-truncated Poisson loop per stream (1A S4), all attempts in one kernel call.

    Returns a dict:

    * per row: ``k_final`` (int64; 0 when exhausted), ``attempts`` (int64), ``exhausted`` (bool),
      ``hi_after``, ``lo_after``;
    * per Poisson attempt (one future ``poisson_component`` event each, rows in order of
      (row, attempt)): ``att_row`` (int64 row index), ``att_attempt`` (1-based), ``att_k``,
      ``att_before_hi``, ``att_before_lo``, ``att_after_hi``, ``att_after_lo``, ``att_blocks``,
      ``att_draws`` (uint64).

    Rows with lambda == 0 are the caller's A = 0 / no-draw business; pass only rows that draw.
    """
    key, hi, lo = _streams(key, hi, lo)
    n = key.shape[0]
    lm = _param(lam, n)
    if int(max_zero_attempts) < 1:
        raise ValueError("max_zero_attempts must be >= 1")
    k_final = np.empty(n, np.int64)
    attempts = np.empty(n, np.int64)
    exhausted = np.empty(n, np.bool_)
    hi_a = np.empty(n, np.uint64)
    lo_a = np.empty(n, np.uint64)
    status = np.zeros(n, np.int8)
    recs = _k().ztp_kernel(key, hi, lo, lm, int(max_zero_attempts), int(max_attempts), POISSON_LAMBDA_MAX,
                           k_final, attempts, exhausted, hi_a, lo_a, status)
    _check(status, "ztp_poisson", lm)
    names = ("att_row", "att_attempt", "att_k", "att_before_hi", "att_before_lo", "att_after_hi",
             "att_after_lo", "att_blocks", "att_draws")
    out = {"k_final": k_final, "attempts": attempts, "exhausted": exhausted, "hi_after": hi_a, "lo_after": lo_a}
    out.update(dict(zip(names, recs)))
    return out
