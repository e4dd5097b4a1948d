"""numba kernels behind :mod:`engine.core.rng` and :mod:`engine.core.samplers`.

Everything here must give the same bits as the scalar Python references
(``rng.philox2x64_10``, ``rng.u01`` and the samplers in ``samplers.py``):

* no ``fastmath`` anywhere (00-core section 4: no FMA, no reassociation); numba emits plain
  ``fmul``/``fadd`` without contraction flags, so every operation rounds on its own, in the order
  written;
* ``math.log/exp/cos/sqrt/pow`` compile to the LLVM intrinsics, which call the same glibc libm
  the interpreter's ``math`` module calls (no SVML in this environment; ``tests/test_samplers.py``
  checks the equality on many inputs, so a build with a different vector library would fail);
* ``math.lgamma`` is the exception: numba calls glibc ``lgamma`` while CPython's
  ``math.lgamma`` is CPython's own Lanczos approximation, and the two differ in the last bits.
  :func:`lgamma_py` below re-implements CPython 3.11's algorithm (same coefficients, same order of
  operations, glibc ``log``) so the kernels agree with the scalar reference bit for bit
  (tested on integers and on random reals);
* the 64x64->128 multiply of Philox is done exactly with an LLVM ``i128`` multiply
  (:func:`_umulhi`), which x86-64 lowers to one ``mul``/``mulx``.

Kernels are compiled lazily on first call and cached on disk (``cache=True``), so a state
that uses two samplers compiles only those two (plus their shared helpers).

Status codes written by the sampler kernels (the Python wrappers raise
:class:`engine.core.errors.ModelError` with the matching code and the first offending rows):
``ST_OK = 0``, ``ST_PARAM = 1`` (non-finite or out-of-domain parameter),
``ST_EXHAUSTED = 2`` (rejection cap reached), ``ST_NONFINITE = 3`` (non-finite result).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# --- constants (00-core 3.1, 3.4, 3.5; decision 14) -------------------------------------------
M0 = np.uint64(0xD2B74407B1CE6E93)  # Philox2x64 multiplier
W0 = np.uint64(0x9E3779B97F4A7C15)  # Weyl key bump
U64_ZERO = np.uint64(0)
U64_ONE = np.uint64(1)
U64_MAX = np.uint64(0xFFFFFFFFFFFFFFFF)
TWO64 = 18446744073709551616.0  # 2^64 exactly: u01 of x = 2^64 - 1 (x + 1 wraps in uint64)
TWO_M64 = float.fromhex("0x1p-64")
ONE_MINUS = float.fromhex("0x1.fffffffffffffp-1")  # u01 never returns 1.0
TAU = float.fromhex("0x1.921fb54442d18p+2")  # Box-Muller; never computed as 2*pi
POISSON_INVERSION_LIMIT = 10.0  # lambda* of 00-core 3.5: inversion below, PTRS at or above

ST_OK = 0
ST_PARAM = 1
ST_EXHAUSTED = 2
ST_NONFINITE = 3


# --- exact 64x64 -> high 64 bits ------------------------------------------------------------
@intrinsic
def _umulhi(typingctx, a, b):
    """High 64 bits of the exact 128-bit product of two uint64 (LLVM i128 multiply)."""
    if a != types.uint64 or b != types.uint64:
        return None
    sig = types.uint64(types.uint64, types.uint64)

    def codegen(context, builder, signature, args):
        i128 = ir.IntType(128)
        p = builder.mul(builder.zext(args[0], i128), builder.zext(args[1], i128))
        return builder.trunc(builder.lshr(p, ir.Constant(i128, 64)), ir.IntType(64))

    return sig, codegen


@njit(inline="always")
def philox(key, hi, lo):
    """Philox2x64-10 block of counter (hi, lo) under ``key`` (word0 = lo, word1 = hi)."""
    a = lo
    b = hi
    k = key
    for _ in range(10):
        p_hi = _umulhi(M0, a)
        p_lo = M0 * a
        a = p_hi ^ k ^ b
        b = p_lo
        k = k + W0
    return a, b


@njit(inline="always")
def next_block(key, hi, lo):
    """One block at (hi, lo); returns (x0, x1, hi', lo') with the counter advanced by 1."""
    x0, x1 = philox(key, hi, lo)
    lo2 = lo + U64_ONE
    hi2 = hi
    if lo2 == U64_ZERO:
        hi2 = hi + U64_ONE
    return x0, x1, hi2, lo2


@njit(inline="always")
def u01(x):
    """Decision 14: (x + 1 exactly) rounded to binary64, times 2^-64; 1.0 -> 0x1.fffffffffffffp-1."""
    if x == U64_MAX:
        f = TWO64
    else:
        f = np.float64(x + U64_ONE)
    u = f * TWO_M64
    if u == 1.0:
        u = ONE_MINUS
    return u


# --- CPython 3.11 math.lgamma, re-implemented for positive arguments ------------------------
# Lanczos approximation with g = 6.024680040776729583740234375 and N = 13 (the coefficients
# CPython's mathmodule.c uses); evaluated in the same order so the bits equal math.lgamma.
_LANCZOS_G = 6.024680040776729583740234375
_LANCZOS_NUM = (
    23531376880.410759688572007674451636754734846804940,
    42919803642.649098768957899047001988850926355848959,
    35711959237.355668049440185451547166705960488635843,
    17921034426.037209699919755754458931112671403265390,
    6039542586.3520280050642916443072979210699388420708,
    1439720407.3117216736632230727949123939715485786772,
    248874557.86205415651146038641322942321632125127801,
    31426415.585400194380614231628318205362874684987640,
    2876370.6289353724412254090516208496135991145378768,
    186056.26539522349504029498971604569928220784236328,
    8071.6720023658162106380029022722506138218516325024,
    210.82427775157934587250973392071336271166969580291,
    2.5066282746310002701649081771338373386264310793408,
)
_LANCZOS_DEN = (
    0.0, 39916800.0, 120543840.0, 150917976.0, 105258076.0, 45995730.0,
    13339535.0, 2637558.0, 357423.0, 32670.0, 1925.0, 66.0, 1.0,
)
_LANCZOS_NUM_A = np.array(_LANCZOS_NUM, dtype=np.float64)
_LANCZOS_DEN_A = np.array(_LANCZOS_DEN, dtype=np.float64)


@njit(inline="always")
def _lanczos_sum(x):
    num = 0.0
    den = 0.0
    if x < 5.0:
        for j in range(12, -1, -1):
            num = num * x + _LANCZOS_NUM_A[j]
            den = den * x + _LANCZOS_DEN_A[j]
    else:
        for j in range(13):
            num = num / x + _LANCZOS_NUM_A[j]
            den = den / x + _LANCZOS_DEN_A[j]
    return num / den


@njit
def lgamma_py(x):
    """Bit-identical to CPython 3.11 ``math.lgamma(x)`` for finite ``x > 0`` (NaN otherwise)."""
    if not (x > 0.0) or not math.isfinite(x):
        return math.nan
    if x == math.floor(x) and x <= 2.0:
        return 0.0
    if x < 1e-20:
        return -math.log(x)
    r = math.log(_lanczos_sum(x)) - _LANCZOS_G
    r = r + (x - 0.5) * (math.log(x + _LANCZOS_G - 0.5) - 1.0)
    return r


# --- vectorised Philox / u01 -----------------------------------------------------------------
@njit(cache=True)
def philox_kernel(key, hi, lo, x0, x1):
    for i in range(key.shape[0]):
        a, b = philox(key[i], hi[i], lo[i])
        x0[i] = a
        x1[i] = b


@njit(cache=True)
def u01_kernel(x, out):
    for i in range(x.shape[0]):
        out[i] = u01(x[i])


@njit(cache=True)
def mathcheck_kernel(which, x, y, out):
    """Test hook: the kernels' view of libm (0 log, 1 exp, 2 cos, 3 sqrt, 4 lgamma_py, 5 pow)."""
    for i in range(x.shape[0]):
        if which == 0:
            out[i] = math.log(x[i])
        elif which == 1:
            out[i] = math.exp(x[i])
        elif which == 2:
            out[i] = math.cos(x[i])
        elif which == 3:
            out[i] = math.sqrt(x[i])
        elif which == 4:
            out[i] = lgamma_py(x[i])
        else:
            out[i] = x[i] ** y[i]


# --- per-stream sampler cores (state = key, hi, lo; budgets counted explicitly) --------------
@njit(inline="always")
def _normal(key, hi, lo):
    """Box-Muller, cosine only: one block, (u1, u2) = (u01(x0), u01(x1)); 1 block, 2 draws."""
    x0, x1, hi, lo = next_block(key, hi, lo)
    u1 = u01(x0)
    u2 = u01(x1)
    z = math.sqrt(-2.0 * math.log(u1)) * math.cos(TAU * u2)
    return z, hi, lo


@njit(inline="always")
def _gamma_mt(key, hi, lo, alpha, max_attempts):
    """Marsaglia-Tsang Gamma(alpha, 1), alpha >= 1. Returns (g, hi, lo, blocks, draws, status)."""
    d = alpha - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    blocks = 0
    draws = 0
    for _ in range(max_attempts):
        z, hi, lo = _normal(key, hi, lo)
        blocks += 1
        draws += 2
        x = 1.0 + c * z
        if x <= 0.0:
            continue
        v = x * x * x
        x0, x1, hi, lo = next_block(key, hi, lo)
        blocks += 1
        draws += 1
        u = u01(x0)
        if math.log(u) < 0.5 * (z * z) + d - d * v + d * math.log(v):
            return d * v, hi, lo, blocks, draws, ST_OK
    return math.nan, hi, lo, blocks, draws, ST_EXHAUSTED


@njit(inline="always")
def _gamma(key, hi, lo, alpha, max_attempts):
    """Gamma(alpha, 1); alpha < 1 uses Gamma(alpha + 1) * u^(1/alpha) (one more block and draw)."""
    if not math.isfinite(alpha) or not (alpha > 0.0):
        return math.nan, hi, lo, 0, 0, ST_PARAM
    if alpha >= 1.0:
        g, hi, lo, blocks, draws, st = _gamma_mt(key, hi, lo, alpha, max_attempts)
    else:
        g1, hi, lo, blocks, draws, st = _gamma_mt(key, hi, lo, alpha + 1.0, max_attempts)
        if st != ST_OK:
            return math.nan, hi, lo, blocks, draws, st
        x0, x1, hi, lo = next_block(key, hi, lo)
        blocks += 1
        draws += 1
        u = u01(x0)
        g = g1 * (u ** (1.0 / alpha))
    if st == ST_OK and not math.isfinite(g):
        st = ST_NONFINITE
    return g, hi, lo, blocks, draws, st


@njit(inline="always")
def _poisson(key, hi, lo, lam, max_attempts, lam_max):
    """Poisson(lam): inversion for lam < 10, textbook PTRS for lam >= 10 (decision 7).

    Returns (k, hi, lo, blocks, draws, status). ``max_attempts`` caps inversion draws (so
    k <= max_attempts - 1) and PTRS attempts.
    """
    if not math.isfinite(lam) or lam < 0.0 or lam > lam_max:
        return 0, hi, lo, 0, 0, ST_PARAM
    blocks = 0
    draws = 0
    if lam < POISSON_INVERSION_LIMIT:
        big_l = math.exp(-lam)
        p = 1.0
        k = 0
        for _ in range(max_attempts):
            x0, x1, hi, lo = next_block(key, hi, lo)
            blocks += 1
            draws += 1
            p = p * u01(x0)
            if p <= big_l:
                return k, hi, lo, blocks, draws, ST_OK
            k += 1
        return 0, hi, lo, blocks, draws, ST_EXHAUSTED
    slam = math.sqrt(lam)
    loglam = math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
    v_r = 0.9277 - 3.6224 / (b - 2.0)
    for _ in range(max_attempts):
        x0, x1, hi, lo = next_block(key, hi, lo)
        blocks += 1
        draws += 2
        u = u01(x0)
        v = u01(x1)
        uu = u - 0.5
        us = 0.5 - abs(uu)
        kf = math.floor((2.0 * a / us + b) * uu + lam + 0.43)
        if us >= 0.07 and v <= v_r:
            return np.int64(kf), hi, lo, blocks, draws, ST_OK
        if kf < 0.0 or (us < 0.013 and v > us):
            continue
        lhs = math.log(v * inv_alpha / (a / (us * us) + b))
        rhs = -lam + kf * loglam - lgamma_py(kf + 1.0)
        if lhs <= rhs:
            return np.int64(kf), hi, lo, blocks, draws, ST_OK
    return 0, hi, lo, blocks, draws, ST_EXHAUSTED


# --- vectorised sampler kernels ----------------------------------------------------------------
@njit(cache=True)
def uniform1_kernel(key, hi, lo, u, hi_a, lo_a):
    for i in range(key.shape[0]):
        x0, x1, h, l = next_block(key[i], hi[i], lo[i])
        u[i] = u01(x0)
        hi_a[i] = h
        lo_a[i] = l


@njit(cache=True)
def uniform2_kernel(key, hi, lo, u0, u1, hi_a, lo_a):
    for i in range(key.shape[0]):
        x0, x1, h, l = next_block(key[i], hi[i], lo[i])
        u0[i] = u01(x0)
        u1[i] = u01(x1)
        hi_a[i] = h
        lo_a[i] = l


@njit(cache=True)
def bernoulli_kernel(key, hi, lo, pi, u, is_multi, det, hi_a, lo_a, blocks, draws, status):
    for i in range(key.shape[0]):
        p = pi[i]
        h = hi[i]
        l = lo[i]
        if not math.isfinite(p) or p < 0.0 or p > 1.0:
            status[i] = ST_PARAM
            u[i] = math.nan
            is_multi[i] = False
            det[i] = True
            blocks[i] = 0
            draws[i] = 0
        elif p == 0.0 or p == 1.0:
            # 00-core 3.5: pi in {0, 1} -> no draw, u = null, deterministic = true
            u[i] = math.nan
            is_multi[i] = p == 1.0
            det[i] = True
            blocks[i] = 0
            draws[i] = 0
        else:
            x0, x1, h, l = next_block(key[i], h, l)
            uu = u01(x0)
            u[i] = uu
            is_multi[i] = uu < p
            det[i] = False
            blocks[i] = 1
            draws[i] = 1
        hi_a[i] = h
        lo_a[i] = l


@njit(cache=True)
def normal_kernel(key, hi, lo, z, hi_a, lo_a):
    for i in range(key.shape[0]):
        zz, h, l = _normal(key[i], hi[i], lo[i])
        z[i] = zz
        hi_a[i] = h
        lo_a[i] = l


@njit(cache=True)
def gamma_kernel(key, hi, lo, alpha, max_attempts, out, hi_a, lo_a, blocks, draws, status):
    for i in range(key.shape[0]):
        g, h, l, nb, nd, st = _gamma(key[i], hi[i], lo[i], alpha[i], max_attempts)
        out[i] = g
        hi_a[i] = h
        lo_a[i] = l
        blocks[i] = nb
        draws[i] = nd
        status[i] = st


@njit(cache=True)
def poisson_kernel(key, hi, lo, lam, max_attempts, lam_max, out, hi_a, lo_a, blocks, draws, status):
    for i in range(key.shape[0]):
        k, h, l, nb, nd, st = _poisson(key[i], hi[i], lo[i], lam[i], max_attempts, lam_max)
        out[i] = k
        hi_a[i] = h
        lo_a[i] = l
        blocks[i] = nb
        draws[i] = nd
        status[i] = st


@njit(cache=True)
def gumbel_kernel(key, hi, lo, w, g, u, hi_a, lo_a, status):
    for i in range(key.shape[0]):
        ww = w[i]
        x0, x1, h, l = next_block(key[i], hi[i], lo[i])
        uu = u01(x0)
        u[i] = uu
        hi_a[i] = h
        lo_a[i] = l
        if math.isnan(ww) or ww < 0.0 or math.isinf(ww):
            status[i] = ST_PARAM
            g[i] = math.nan
        elif ww == 0.0:
            g[i] = -math.inf  # zero weight: never selected, still consumes its uniform
        else:
            g[i] = math.log(ww) - math.log(-math.log(uu))


@njit(cache=True)
def ztp_kernel(key, hi, lo, lam, max_zero_attempts, max_attempts, lam_max,
               k_final, attempts, exhausted, hi_a, lo_a, status):
    """Zero-truncated Poisson loop (1A S4): Poisson attempts until k >= 1, at most
    ``max_zero_attempts`` attempts. Returns the per-attempt records as flat arrays."""
    n = key.shape[0]
    cap = n + 16
    r_row = np.empty(cap, np.int64)
    r_att = np.empty(cap, np.int64)
    r_k = np.empty(cap, np.int64)
    r_bh = np.empty(cap, np.uint64)
    r_bl = np.empty(cap, np.uint64)
    r_ah = np.empty(cap, np.uint64)
    r_al = np.empty(cap, np.uint64)
    r_nb = np.empty(cap, np.uint64)
    r_nd = np.empty(cap, np.uint64)
    m = 0
    for i in range(n):
        h = hi[i]
        l = lo[i]
        k_final[i] = 0
        attempts[i] = 0
        exhausted[i] = False
        status[i] = ST_OK
        for a in range(1, max_zero_attempts + 1):
            k, h2, l2, nb, nd, st = _poisson(key[i], h, l, lam[i], max_attempts, lam_max)
            if st != ST_OK:
                status[i] = st
                break
            if m == cap:
                cap = cap * 2
                t_row = np.empty(cap, np.int64); t_row[:m] = r_row[:m]; r_row = t_row
                t_att = np.empty(cap, np.int64); t_att[:m] = r_att[:m]; r_att = t_att
                t_k = np.empty(cap, np.int64); t_k[:m] = r_k[:m]; r_k = t_k
                t_bh = np.empty(cap, np.uint64); t_bh[:m] = r_bh[:m]; r_bh = t_bh
                t_bl = np.empty(cap, np.uint64); t_bl[:m] = r_bl[:m]; r_bl = t_bl
                t_ah = np.empty(cap, np.uint64); t_ah[:m] = r_ah[:m]; r_ah = t_ah
                t_al = np.empty(cap, np.uint64); t_al[:m] = r_al[:m]; r_al = t_al
                t_nb = np.empty(cap, np.uint64); t_nb[:m] = r_nb[:m]; r_nb = t_nb
                t_nd = np.empty(cap, np.uint64); t_nd[:m] = r_nd[:m]; r_nd = t_nd
            r_row[m] = i
            r_att[m] = a
            r_k[m] = k
            r_bh[m] = h
            r_bl[m] = l
            r_ah[m] = h2
            r_al[m] = l2
            r_nb[m] = nb
            r_nd[m] = nd
            m += 1
            h = h2
            l = l2
            attempts[i] = a
            if k >= 1:
                k_final[i] = k
                break
            if a == max_zero_attempts:
                exhausted[i] = True
        hi_a[i] = h
        lo_a[i] = l
    return (r_row[:m].copy(), r_att[:m].copy(), r_k[:m].copy(), r_bh[:m].copy(), r_bl[:m].copy(),
            r_ah[:m].copy(), r_al[:m].copy(), r_nb[:m].copy(), r_nd[:m].copy())
