"""1A S0 — foundations (00-core 6.2 and 7; consumes no randomness).

``run(ctx)`` (state ``1A.S0``): load and validate every 1A input, check the resolved identities against ``ctx.ids``, run
the numeric self-tests, compute the per-merchant design inputs, hurdle probabilities, cross-border
eligibility and openness, then publish (atomic, write-once):

* ``sealed_inputs_1A`` (``fingerprint=``): every sealed input / parameter with its digest;
* ``s0_gate_receipt_1A`` (``fingerprint=``): the receipt plus the lineage evidence S9 copies
  (``param_digest_log.jsonl``, ``fingerprint_artifacts.jsonl``, ``parameter_hash_resolved.json``,
  ``manifest_fingerprint_resolved.json``, ``numeric_policy_attest.json``) — no timestamps, hostnames,
  platform strings or filesystem locations (decisions 4, 5, 15), so the bytes depend only on what the
  fingerprint covers;
* ``hurdle_design_matrix``, ``hurdle_pi_probs``, ``crossborder_eligibility_flags``,
  ``crossborder_features``, ``merchant_abort_log`` (``parameter_hash=/fingerprint=``, decision 13);
* :func:`run_rng_anchor` (state ``1A.S0.anchor``): the RNG audit row and the non-consuming ``anchor`` event
  (module ``1A.s0``, label ``s0.anchor``), seed-scoped, after the receipt exists.

Everything that can fail is checked before the first byte is published.

Numeric policy (00-core 4): sums on decision paths are fixed-order Neumaier over per-term numpy arrays
(every ufunc rounds on its own, so there is no FMA and no BLAS); transcendental functions are scalar
``math.*`` evaluated on the distinct values only (the design is categorical, so there are few), never
numpy's SIMD ufuncs whose last bits may differ between CPUs.

Pure functions used by S1, S2 and the validators: :func:`category_index`, :func:`attach_gdp`,
:func:`hurdle_eta_pi`, :func:`logistic`, :func:`neumaier_rows`, :func:`design_vectors`,
:func:`design_column_names`, :func:`eligibility_flags`, :func:`openness`, :func:`numeric_self_tests`,
:func:`compute_s0`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from decimal import Decimal, getcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.core.numeric import neumaier_sum
from engine.core.errors import IdentityError, InputError, ModelError
from engine.segment1a import inputs as inp
from engine.segment1a.inputs import (
    CHANNELS,
    CrossborderHyperparams,
    DispersionCoefficients,
    HurdleCoefficients,
    OpennessParams,
)

MODULE = "1A.s0"
ANCHOR_LABEL = "s0.anchor"
ANCHOR_FAMILY = "anchor"
SCHEMA_DIR = inp.REPO_ROOT / "contracts" / "schemas" / "1A"
PUBLISH_CODE = "E_IMMUTABLE_PARTITION_EXISTS_NONIDENTICAL"  # decision 21

# Lineage evidence kept beside the receipt for S9 (00-core 5.1).
LINEAGE_FILES = (
    "param_digest_log.jsonl",
    "fingerprint_artifacts.jsonl",
    "parameter_hash_resolved.json",
    "manifest_fingerprint_resolved.json",
    "numeric_policy_attest.json",
)


# ============================================================================================
# numeric helpers
# ============================================================================================


def neumaier_rows(terms: list[np.ndarray]) -> np.ndarray:
    """Element-wise Neumaier sum of ``terms`` in the given order (00-core 4; HEAD code, not Kahan).

    ``t = s + x; c += (s - t) + x if |s| >= |x| else (x - t) + s; s = t``; result ``s + c``. Each numpy
    ufunc rounds once, so this is the scalar loop applied to every row, bit for bit.
    """
    if not terms:
        raise ValueError("neumaier_rows needs at least one term")
    s = np.zeros(np.shape(terms[0]), dtype=np.float64)
    c = np.zeros_like(s)
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite results are checked by the callers
        for x in terms:
            x = np.asarray(x, dtype=np.float64)
            t = s + x
            big = np.abs(s) >= np.abs(x)
            c = c + np.where(big, (s - t) + x, (x - t) + s)
            s = t
        return s + c


# Scalar reference of :func:`neumaier_rows` (validators, tests): the one shared implementation.
neumaier_scalar = neumaier_sum

def logistic(eta: float) -> float:
    """Two-branch logistic, no clamping (00-core 7.3, 1A-S1-S4 1.3)."""
    if eta >= 0.0:
        return 1.0 / (1.0 + math.exp(-eta))
    e = math.exp(eta)
    return e / (1.0 + e)


def _map_scalar(fn: Callable[[float], float], arr: np.ndarray) -> np.ndarray:
    """Apply a scalar ``math`` function to every element (used on distinct values only)."""
    a = np.asarray(arr, dtype=np.float64)
    return np.fromiter((fn(x) for x in a.tolist()), dtype=np.float64, count=a.size).reshape(a.shape)


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


# ============================================================================================
# design
# ============================================================================================


def category_index(mcc: np.ndarray, channel: Any, dict_mcc: np.ndarray, *, merchant_id=None,
                   path=None) -> tuple[np.ndarray, np.ndarray]:
    """``(mcc_idx int32 into dict_mcc, ch_idx int8 0=CP 1=CNP)``.

    An MCC absent from ``dict_mcc`` -> ``E_DSGN_UNKNOWN_MCC`` (00-core 7.3); a channel outside CP/CNP ->
    ``E_DSGN_UNKNOWN_CHANNEL``.
    """
    mcc = np.asarray(mcc, dtype=np.int64)
    dm = np.asarray(dict_mcc, dtype=np.int64)
    lut = np.full(10000, -1, dtype=np.int32)
    lut[dm] = np.arange(dm.size, dtype=np.int32)
    inr = (mcc >= 0) & (mcc <= 9999)
    idx = np.where(inr, lut[np.clip(mcc, 0, 9999)], -1).astype(np.int32)
    if (idx < 0).any():
        bad = np.flatnonzero(idx < 0)
        codes = np.unique(mcc[bad])
        raise InputError(
            "E_DSGN_UNKNOWN_MCC",
            f"{bad.size} merchant(s) have an MCC absent from the coefficient dictionary dict_mcc "
            f"({codes.size} distinct: {', '.join(str(int(c)) for c in codes[:20])})",
            path=path,
            rows=[f"merchant_id={int(merchant_id[i]) if merchant_id is not None else i} mcc={int(mcc[i])}"
                  for i in bad[:10]],
        )
    ch = channel if isinstance(channel, (pa.Array, pa.ChunkedArray)) else pa.array(np.asarray(channel, dtype=object))
    pos = pc.index_in(ch, value_set=pa.array(list(CHANNELS)))
    if pos.null_count:
        bad = np.flatnonzero(np.asarray(pc.is_null(pos).to_numpy(zero_copy_only=False)))
        raise InputError("E_DSGN_UNKNOWN_CHANNEL", f"channel outside {list(CHANNELS)}", path=path,
                         rows=[f"row {i}: channel={ch[int(i)].as_py()!r}" for i in bad[:10]])
    ch_idx = np.asarray(pos.to_numpy(zero_copy_only=False), dtype=np.int8)
    return idx, ch_idx


def country_index(home_iso: Any, iso_codes_: np.ndarray) -> np.ndarray:
    """Index of each merchant's home country in the (sorted) ISO code list; -1 when absent."""
    h = home_iso if isinstance(home_iso, (pa.Array, pa.ChunkedArray)) else pa.array(np.asarray(home_iso, dtype=object))
    pos = pc.index_in(h, value_set=pa.array(np.asarray(iso_codes_, dtype=object), pa.string()))
    return np.asarray(pc.fill_null(pos, -1).to_numpy(zero_copy_only=False), dtype=np.int32)


def attach_gdp(cidx: np.ndarray, iso_codes_: np.ndarray, gdp: dict[str, float], buckets: dict[str, int], *,
               merchant_id=None, gdp_path=None, bucket_path=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per merchant ``(g_c, ln g_c, bucket)`` from its home country index (00-core 7.2 step 4).

    Missing GDP -> ``E_GDP_MISSING``; missing bucket -> ``E_BUCKET_MISSING``. ``ln`` is ``math.log`` per
    country (scalar libm; decision path of the NB dispersion).
    """
    codes = [str(c) for c in np.asarray(iso_codes_, dtype=object)]
    g_iso = np.array([gdp.get(c, math.nan) for c in codes], dtype=np.float64)
    b_iso = np.array([buckets.get(c, 0) for c in codes], dtype=np.int8)
    lng_iso = _map_scalar(lambda x: math.log(x) if x > 0 else math.nan, g_iso)
    used = np.zeros(len(codes), dtype=bool)
    used[cidx[cidx >= 0]] = True

    def _fail(code, what, missing_iso, path):
        miss = set(np.flatnonzero(missing_iso).tolist())
        rows_i = np.flatnonzero(np.isin(cidx, list(miss)))
        raise InputError(code, f"no {what} for home countries {', '.join(codes[i] for i in sorted(miss))}",
                         path=path,
                         rows=[f"merchant_id={int(merchant_id[i]) if merchant_id is not None else i} "
                               f"home_country_iso={codes[cidx[i]]}" for i in rows_i[:10]],
                         detail={"countries": [codes[i] for i in sorted(miss)]})

    if (used & np.isnan(g_iso)).any():
        _fail("E_GDP_MISSING", f"{inp.GDP_YEAR} GDP per capita row", used & np.isnan(g_iso), gdp_path)
    if (used & (b_iso == 0)).any():
        _fail("E_BUCKET_MISSING", "GDP bucket", used & (b_iso == 0), bucket_path)
    return g_iso[cidx], lng_iso[cidx], b_iso[cidx]


def design_column_names(hc: HurdleCoefficients) -> dict[str, list[str]]:
    """Column names of the three designs in coefficient order (00-core 7.3)."""
    m = [f"mcc_{int(c)}" for c in hc.dict_mcc]
    ch = [f"ch_{c}" for c in hc.dict_ch]
    return {
        "hurdle": ["intercept"] + m + ch + [f"gdp_bucket_{b}" for b in hc.dict_dev5],
        "nb_mean": ["intercept"] + m + ch,
        "nb_dispersion": ["intercept"] + m + ch + ["ln_gdp_pc_usd_2015"],
    }


def design_vectors(n_mcc: int, mcc_idx, ch_idx, bucket, ln_g) -> dict[str, np.ndarray]:
    """Dense design rows (float64) for a few merchants — for tests and validators, not the hot path.

    ``x_hurdle = [1 | onehot_mcc | onehot_ch | onehot_bucket]``, ``x_nb_mean = [1 | onehot_mcc | onehot_ch]``,
    ``x_nb_dispersion = [1 | onehot_mcc | onehot_ch | ln g]``.
    """
    mcc_idx = np.asarray(mcc_idx, dtype=np.int64)
    ch_idx = np.asarray(ch_idx, dtype=np.int64)
    bucket = np.asarray(bucket, dtype=np.int64)
    n = mcc_idx.size
    C = int(n_mcc)
    r = np.arange(n)
    xh = np.zeros((n, 1 + C + 2 + 5))
    xh[:, 0] = 1.0
    xh[r, 1 + mcc_idx] = 1.0
    xh[r, 1 + C + ch_idx] = 1.0
    xh[r, 1 + C + 2 + bucket - 1] = 1.0
    xm = xh[:, : 1 + C + 2].copy()
    xp = np.concatenate([xm, np.asarray(ln_g, dtype=np.float64).reshape(n, 1)], axis=1)
    return {"hurdle": xh, "nb_mean": xm, "nb_dispersion": xp}


def dense_levels(key: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(distinct keys ascending, inverse)`` for integer keys in ``[0, size)`` in O(n) (no sort)."""
    key = np.asarray(key, dtype=np.int64)
    present = np.zeros(size, dtype=bool)
    present[key] = True
    ukey = np.flatnonzero(present)
    remap = np.full(size, -1, dtype=np.int64)
    remap[ukey] = np.arange(ukey.size, dtype=np.int64)
    return ukey.astype(np.int64), remap[key]


def hurdle_eta_pi(hc: HurdleCoefficients, mcc_idx: np.ndarray, ch_idx: np.ndarray, bucket: np.ndarray, *,
                  merchant_id=None, eta_code: str = "E_PI_NAN_OR_INF",
                  pi_code: str = "E_PI_NAN_OR_INF") -> tuple[np.ndarray, np.ndarray]:
    """Hurdle ``(eta, pi)`` per merchant, binary64 (00-core 7.3; 1A-S1-S4 1.3).

    ``eta = Neumaier(beta_0, beta_mcc[i], beta_ch[j], beta_bucket[k])`` (equal to the full fixed-order dot
    product: the zero terms of the one-hot design are exact no-ops); ``pi`` two-branch logistic, no clamping.
    Evaluated once per distinct (mcc, channel, bucket) level (the design is categorical) and gathered.
    Non-finite eta -> ``eta_code``; non-finite pi or pi outside [0, 1] -> ``pi_code`` (decision 8).
    """
    C = hc.n_mcc
    mcc_idx = np.asarray(mcc_idx, dtype=np.int64)
    ch_idx = np.asarray(ch_idx, dtype=np.int64)
    bucket = np.asarray(bucket, dtype=np.int64)
    key = (mcc_idx * 2 + ch_idx) * 5 + (bucket - 1)
    ukey, inv = dense_levels(key, C * 10)
    um = ukey // 10
    uc = (ukey // 5) % 2
    ub = ukey % 5
    b = hc.beta
    eta_u = neumaier_rows([np.full(ukey.size, b[0]), b[1 + um], b[1 + C + uc], b[1 + C + 2 + ub]])
    if not np.isfinite(eta_u).all():
        bad = np.flatnonzero(~np.isfinite(eta_u[inv]))
        raise ModelError(eta_code, f"hurdle linear predictor eta is not finite for {bad.size} merchant(s)",
                         path=hc.path, rows=_mid_rows(bad, merchant_id))
    pi_u = _map_scalar(logistic, eta_u)
    if not (np.isfinite(pi_u) & (pi_u >= 0.0) & (pi_u <= 1.0)).all():
        bad = np.flatnonzero(~(np.isfinite(pi_u[inv]) & (pi_u[inv] >= 0) & (pi_u[inv] <= 1)))
        raise ModelError(pi_code, f"hurdle probability pi is not finite or outside [0, 1] for {bad.size} merchant(s)",
                         path=hc.path, rows=_mid_rows(bad, merchant_id))
    return eta_u[inv], pi_u[inv]


def _mid_rows(idx: np.ndarray, merchant_id) -> list[str]:
    return [f"merchant_id={int(merchant_id[i])}" if merchant_id is not None else f"row {int(i)}" for i in idx[:10]]


# ============================================================================================
# eligibility and openness
# ============================================================================================


def _mcc_lut(mcc_any: bool, codes, ranges) -> np.ndarray:
    lut = np.zeros(10000, dtype=bool)
    if mcc_any:
        lut[:] = True
        return lut
    if codes:
        lut[np.asarray(codes, dtype=np.int64)] = True
    for lo, hi in ranges:
        lut[lo: hi + 1] = True
    return lut


def eligibility_flags(cb: CrossborderHyperparams, mcc: np.ndarray, ch_idx: np.ndarray, cidx: np.ndarray,
                      iso_codes_: np.ndarray) -> tuple[np.ndarray, pa.Array]:
    """Cross-border eligibility (00-core 7.5): ``(is_eligible bool[], reason string array)``.

    Any matching deny beats every allow: deny rules in (priority, ASCII id) order decide first, then allow
    rules in the same order, then ``default_decision`` with reason ``default_allow`` / ``default_deny``.
    Vectorised: one boolean lookup per rule over MCC (10,000 codes), channel and country index.
    """
    mcc = np.asarray(mcc, dtype=np.int64)
    n = mcc.size
    codes = [str(c) for c in np.asarray(iso_codes_, dtype=object)]
    decided = np.zeros(n, dtype=bool)
    elig = np.zeros(n, dtype=bool)
    reason_idx = np.full(n, -1, dtype=np.int32)
    reasons: list[str] = []
    for decision in ("deny", "allow"):
        rules = sorted((r for r in cb.rules if r.decision == decision), key=lambda r: (r.priority, r.id.encode("ascii")))
        for r in rules:
            m = _mcc_lut(r.mcc_any, r.mcc_codes, r.mcc_ranges)[mcc]
            if r.channels is not None:
                ch_ok = np.array([c in r.channels for c in CHANNELS], dtype=bool)
                m &= ch_ok[ch_idx]
            if r.isos is not None:
                iso_ok = np.array([c in set(r.isos) for c in codes] + [False], dtype=bool)  # -1 -> False
                m &= iso_ok[np.where(cidx >= 0, cidx, len(codes))]
            m &= ~decided
            if m.any():
                reasons.append(r.id)
                reason_idx[m] = len(reasons) - 1
                elig[m] = decision == "allow"
                decided |= m
    rest = ~decided
    if rest.any():
        reasons.append("default_allow" if cb.default_decision == "allow" else "default_deny")
        reason_idx[rest] = len(reasons) - 1
        elig[rest] = cb.default_decision == "allow"
    reason = pc.take(pa.array(reasons, pa.string()), pa.array(reason_idx)) if n else pa.array([], pa.string())
    return elig, reason


def openness(params: OpennessParams, bucket: np.ndarray, ch_idx: np.ndarray, mcc: np.ndarray) -> np.ndarray:
    """v1 openness heuristic (00-core 7.6): ``clamp01((base[bucket] + delta[channel]) + tilt[mcc])`` in binary64,
    narrowed to float32 (RNE). Tilts: first matching group wins."""
    base = np.asarray(params.base, dtype=np.float64)
    delta = np.asarray(params.channel_delta, dtype=np.float64)
    tilt = np.zeros(10000, dtype=np.float64)
    taken = np.zeros(10000, dtype=bool)
    for _name, value, codes, ranges in params.tilts:
        lut = _mcc_lut(False, codes, ranges) & ~taken
        tilt[lut] = value
        taken |= lut
    x = (base[np.asarray(bucket, dtype=np.int64) - 1] + delta[np.asarray(ch_idx, dtype=np.int64)]) \
        + tilt[np.asarray(mcc, dtype=np.int64)]
    return np.minimum(np.maximum(x, 0.0), 1.0).astype(np.float32)


# ============================================================================================
# numeric self-tests (00-core 4, S0.8) — platform-free booleans only (decision 4)
# ============================================================================================

# Golden libm values (glibc; each equals the correctly rounded result, checked against Decimal at 60
# digits). A different libm build that rounds differently fails E_NUM_LIBM_PROFILE.
_LIBM_GOLDEN = {
    "exp": [(0.5, "0x1.a61298e1e069cp+0"), (1.0, "0x1.5bf0a8b145769p+1"), (10.0, "0x1.5829dcf950560p+14"),
            (-0.75, "0x1.e3b40ebefcd7ep-2"), (3.7, "0x1.4394144eeec81p+5"), (-20.5, "0x1.57a3afeed00abp-30")],
    "log": [(0.5, "-0x1.62e42fefa39efp-1"), (10.0, "0x1.26bb1bbb55516p+1"), (0.001, "-0x1.ba18a998fffa0p+2"),
            (123456.789, "0x1.77281cad8a844p+3"), (7.25, "0x1.fb22e98a1c24ep+0")],
    "cos": [(0.3, "0x1.e921dd42f09bap-1"), (1.0, "0x1.14a280fb5068cp-1"), (2.5, "-0x1.9a2f7ef858b7dp-1")],
    "sqrt": [(0.3, "0x1.186f174f88472p-1"), (2.5, "0x1.94c583ada5b53p+0")],
}


def numeric_self_tests() -> dict[str, bool]:
    """Run the S0.8 self-tests; returns platform-free booleans (no versions, hosts or times)."""
    res: dict[str, bool] = {}
    # binary64 round-half-even: ties go to even, in Python and in numpy
    one = np.array([1.0])
    res["rounding_ok"] = (
        1.0 + 2.0 ** -53 == 1.0
        and 1.0 + 3 * 2.0 ** -53 == 1.0 + 2.0 ** -51
        and float((one + 2.0 ** -53)[0]) == 1.0
        and float((one + 3 * 2.0 ** -53)[0]) == 1.0 + 2.0 ** -51
    )
    # no FMA: a*b + c rounded twice (fused would give -2^-60)
    a, b, c = 1.0 + 2.0 ** -30, 1.0 - 2.0 ** -30, -1.0
    na, nb, nc = np.array([a]), np.array([b]), np.array([c])
    res["fma_off_ok"] = (a * b + c == 0.0) and float((na * nb + nc)[0]) == 0.0 \
        and float(neumaier_rows([na * nb, nc])[0]) == 0.0
    # subnormals preserved (no FTZ/DAZ, also after pyarrow/numba imports)
    tiny = 5e-324
    res["subnormals_ok"] = (tiny * 1.0 == tiny and 2.2250738585072014e-308 / 2 > 0.0
                            and float((np.array([tiny]) * 1.0)[0]) == tiny
                            and float((np.array([2.2250738585072014e-308]) / 2.0)[0]) > 0.0)
    # libm regression suite
    ok = True
    for fn, cases in _LIBM_GOLDEN.items():
        f = getattr(math, fn)
        for x, hx in cases:
            ok &= f(x) == float.fromhex(hx)
    getcontext().prec = 60
    ok &= math.exp(2.0) == float(Decimal(2.0).exp()) and math.log(2.0) == float(Decimal(2.0).ln())
    res["libm_regression_ok"] = bool(ok)
    # Neumaier (true Neumaier, not Kahan: the spec's 4-term example)
    xs = [1.0, 1e100, 1.0, -1e100]
    res["neumaier_ok"] = neumaier_scalar(xs) == 2.0 and float(neumaier_rows([np.array([x]) for x in xs])[0]) == 2.0
    # IEEE totalOrder key: -inf < -1 < -0.0 < +0.0 < 1 < inf
    vals = np.array([1.0, -0.0, np.inf, -1.0, 0.0, -np.inf])
    bits = vals.view(np.uint64)
    sign = (bits >> np.uint64(63)).astype(bool)
    key = np.where(sign, ~bits, bits | np.uint64(1 << 63))
    order = vals[np.argsort(key, kind="stable")]
    want = np.array([-np.inf, -1.0, -0.0, 0.0, 1.0, np.inf])
    res["total_order_ok"] = bool(np.array_equal(order, want) and np.signbit(order[2]) and not np.signbit(order[3]))
    res["passed"] = all(res.values())
    return res


_NUM_CODES = {
    "rounding_ok": "E_NUM_RNDMODE",
    "fma_off_ok": "E_NUM_FMA_ON",
    "subnormals_ok": "E_NUM_FTZ_ON",
    "libm_regression_ok": "E_NUM_LIBM_PROFILE",
    "neumaier_ok": "E_NUM_ULP_MISMATCH",
    "total_order_ok": "E_NUM_TOTORDER_NAN",
}


def check_numeric(res: dict[str, bool]) -> None:
    for k, code in _NUM_CODES.items():
        if not res.get(k, False):
            raise ModelError(code, f"numeric self-test {k} failed (00-core 4)", detail=res)


def load_numeric_profile(numeric_policy_path, math_profile_path) -> dict:
    """Read the two governance artefacts (both sealed in the fingerprint); malformed -> ``E_NUM_PROFILE_ARTIFACT_MISSING``."""
    out = {}
    for key, p in (("numeric_policy", numeric_policy_path), ("math_profile", math_profile_path)):
        try:
            doc = json.loads(Path(p).read_bytes())
        except (OSError, ValueError) as e:
            raise InputError("E_NUM_PROFILE_ARTIFACT_MISSING", f"cannot read {key}: {e}", path=p) from e
        if not isinstance(doc, dict):
            raise InputError("E_NUM_PROFILE_ARTIFACT_MISSING", f"{key} must be a JSON object", path=p)
        out[key] = doc
    mp = out["math_profile"]
    if not isinstance(mp.get("math_profile_id"), str) or not mp["math_profile_id"]:
        raise InputError("E_NUM_PROFILE_ARTIFACT_MISSING", "math_profile lacks math_profile_id", path=math_profile_path)
    return out


# ============================================================================================
# the whole S0 computation (pure)
# ============================================================================================


@dataclass
class S0Inputs:
    merchants: pa.Table  # normalised ingress (inputs.load_merchant_table)
    iso_table: pa.Table
    gdp: dict[str, float]
    buckets: dict[str, int]
    hurdle: HurdleCoefficients
    dispersion: DispersionCoefficients
    crossborder: CrossborderHyperparams
    drop_unplaceable: bool = False
    paths: dict | None = None


@dataclass
class S0Outputs:
    design: pa.Table
    pi: pa.Table
    flags: pa.Table
    features: pa.Table
    abort_log: pa.Table
    counts: dict
    # transient arrays (S1/S2 compute directly from these in tests and benchmarks)
    mcc_idx: np.ndarray
    ch_idx: np.ndarray
    bucket: np.ndarray
    ln_g: np.ndarray
    eta: np.ndarray
    pi_f64: np.ndarray


def _const(value: str, n: int) -> pa.Array:
    return pa.array([value], pa.string()).take(pa.array(np.zeros(n, dtype=np.int64)))


def compute_s0(si: S0Inputs, parameter_hash: str, fingerprint: str) -> S0Outputs:
    """Validate cross-file consistency and build every S0 table (no I/O)."""
    paths = si.paths or {}
    inp.check_coefficients_aligned(si.hurdle, si.dispersion)
    codes = inp.iso_codes(si.iso_table)
    inp.check_eligibility_vocabulary(si.crossborder, codes, si.hurdle.dict_mcc)

    n_ingress = si.merchants.num_rows
    kept, dropped = inp.split_by_home_iso(si.merchants, codes, path=paths.get("merchant_table"),
                                          drop=si.drop_unplaceable)
    m = kept
    n = m.num_rows
    if n == 0:
        raise InputError("E_INGRESS_SCHEMA", "no merchant left in the run", path=paths.get("merchant_table"))
    mid = np.asarray(m.column("merchant_id").to_numpy(), dtype=np.uint64)
    mcc = np.asarray(m.column("mcc").to_numpy(), dtype=np.int32)
    channel = m.column("channel").combine_chunks()
    home = m.column("home_country_iso").combine_chunks()

    mcc_idx, ch_idx = category_index(mcc, channel, si.hurdle.dict_mcc, merchant_id=mid, path=si.hurdle.path)
    cidx = country_index(home, codes)
    g, ln_g, bucket = attach_gdp(cidx, codes, si.gdp, si.buckets, merchant_id=mid,
                                 gdp_path=paths.get("gdp_table"), bucket_path=paths.get("bucket_table"))
    eta, pi = hurdle_eta_pi(si.hurdle, mcc_idx, ch_idx, bucket, merchant_id=mid)
    elig, reason = eligibility_flags(si.crossborder, mcc, ch_idx, cidx, codes)
    op = openness(si.crossborder.openness, bucket, ch_idx, mcc)

    ph = _const(parameter_hash, n)
    fp = _const(fingerprint, n)
    u64 = pa.array(mid, pa.uint64())
    design = pa.table({
        "merchant_id": u64,
        "mcc": pa.array(mcc, pa.int32()),
        "channel": channel,
        "home_country_iso": home,
        "gdp_bucket_id": pa.array(bucket.astype(np.int8), pa.int8()),
        "gdp_pc_usd_2015": pa.array(g, pa.float64()),
        "log_gdp_pc_usd_2015": pa.array(ln_g, pa.float64()),
        "intercept": pa.array(np.ones(n, dtype=np.float32), pa.float32()),
        "parameter_hash": ph,
        "produced_by_fingerprint": fp,
    })
    pi_tab = pa.table({
        "merchant_id": u64,
        "logit": pa.array(eta, pa.float64()),
        "pi": pa.array(pi.astype(np.float32), pa.float32()),  # RNE narrowing (00-core 7.4)
        "parameter_hash": ph,
        "produced_by_fingerprint": fp,
    })
    flags = pa.table({
        "merchant_id": u64,
        "is_eligible": pa.array(elig, pa.bool_()),
        "reason": reason,
        "rule_set": _const(si.crossborder.rule_set_id, n),
        "parameter_hash": ph,
        "produced_by_fingerprint": fp,
    })
    feats = pa.table({
        "merchant_id": u64,
        "openness": pa.array(op, pa.float32()),
        "source": _const(si.crossborder.openness.source, n),
        "parameter_hash": ph,
        "produced_by_fingerprint": fp,
    })
    nd = dropped.num_rows
    dhome = dropped.column("home_country_iso").to_pylist() if nd else []
    abort_log = pa.table({
        "merchant_id": dropped.column("merchant_id") if nd else pa.array([], pa.uint64()),
        "state": _const("S0", nd),
        "module": _const(MODULE, nd),
        "reason": _const("home_country_not_in_iso_table", nd),
        "detail": pa.array([f"home_country_iso={c}" for c in dhome], pa.string()),
        "parameter_hash": _const(parameter_hash, nd),
        "produced_by_fingerprint": _const(fingerprint, nd),
    })
    by_country: dict[str, int] = {}
    for c in dhome:
        by_country[c] = by_country.get(c, 0) + 1
    counts = {
        "merchants_ingress": int(n_ingress),
        "merchants_in_run": int(n),
        "merchants_dropped_unplaceable": int(nd),
        "dropped_by_home_country": {k: by_country[k] for k in sorted(by_country)},
        "eligible": int(elig.sum()),
        "pi_deterministic": int(((pi == 0.0) | (pi == 1.0)).sum()),
    }
    return S0Outputs(design, pi_tab, flags, feats, abort_log, counts, mcc_idx, ch_idx, bucket, ln_g, eta, pi)


def load_s0_inputs(config: dict) -> S0Inputs:
    """Load and validate every file S0 reads, in spec order (00-core 7.2 steps 2-3)."""
    s1a = config["segment1a"]
    ins, par = s1a["inputs"], s1a["parameters"]
    opts = s1a.get("options") or {}
    iso = inp.load_iso_table(ins["iso_table"])
    gdp = inp.load_gdp_table(ins["gdp_table"])
    buckets = inp.load_bucket_table(ins["bucket_table"])
    merchants = inp.load_merchant_table(ins["merchant_table"])
    hc = inp.load_hurdle_coefficients(par["hurdle_coefficients.yaml"])
    dc = inp.load_dispersion_coefficients(par["nb_dispersion_coefficients.yaml"])
    cb = inp.load_crossborder_hyperparams(par["crossborder_hyperparams.yaml"])
    return S0Inputs(merchants, iso, gdp, buckets, hc, dc, cb, bool(opts.get("drop_unplaceable_merchants", False)),
                    paths={k: ins[k] for k in ("merchant_table", "iso_table", "gdp_table", "bucket_table")})


# ============================================================================================
# lineage records (fingerprint-scoped; no locations, no times)
# ============================================================================================

_INPUT_SCHEMAS = {"merchant_table": "schemas/1A/merchant_ids.ingress.schema.json"}


def _jsonl(rows: list[dict]) -> bytes:
    from engine.core.publish import jsonl_bytes

    return jsonl_bytes(rows)


def lineage_records(resolved, attest: dict, counts: dict, options: dict) -> dict[str, Any]:
    """Receipt, sealed-inputs list and lineage evidence from a ``Resolved1A``.

    Paths are the sealed *names* (role names / parameter basenames) — never filesystem locations, which are
    not part of any identity (a user may keep a file anywhere; decisions 4, 13).
    """
    params = sorted(resolved.param_entries, key=lambda e: e["name"].encode("ascii"))
    arts = sorted(resolved.artifact_entries, key=lambda e: e["name"].encode("ascii"))
    pnames = {e["name"] for e in params}
    sealed = []
    for e in arts:
        kind = "options" if e["path"] is None else ("parameter" if e["name"] in pnames else "input")
        sealed.append({
            "asset_id": e["name"],
            "kind": kind,
            "path": e["name"],
            "partition": {},
            "schema_ref": _INPUT_SCHEMAS.get(e["name"]),
            "sha256_hex": e["sha256"],
            "size_bytes": int(e["size_bytes"]),
            "version_tag": None,
        })
    sealed.sort(key=lambda r: (r["asset_id"].encode("ascii"), r["path"].encode("ascii")))
    receipt = {
        "manifest_fingerprint": resolved.manifest_fingerprint,
        "parameter_hash": resolved.parameter_hash,
        "code_digest": resolved.code_digest_hex,
        "sealed_inputs": [{"id": r["asset_id"], "partition": [], "schema_ref": r["schema_ref"]} for r in sealed],
        "options": {k: options[k] for k in sorted(options)},
        "merchants": counts,
        "numeric_self_tests_passed": bool(attest["passed"]),
        "notes": "1A S0 foundations; consumes no randomness. Seed and run_id are not recorded here because this "
                 "partition is fingerprint-scoped (decisions 13, 25).",
    }
    param_log = [{"filename": e["name"], "sha256_hex": e["sha256"], "size_bytes": int(e["size_bytes"])} for e in params]
    fp_arts = [{"path": e["name"], "sha256": e["sha256"], "size_bytes": int(e["size_bytes"])} for e in arts]
    ph_res = {"parameter_hash": resolved.parameter_hash, "filenames_sorted": [e["name"] for e in params],
              "artifact_count": len(params)}
    fp_res = {"manifest_fingerprint": resolved.manifest_fingerprint, "artifact_count": len(arts),
              "git_commit_hex": resolved.code_digest_hex, "code_digest": resolved.code_digest_hex,
              "parameter_hash": resolved.parameter_hash}
    return {"sealed": sealed, "receipt": receipt, "param_digest_log": param_log, "fingerprint_artifacts": fp_arts,
            "parameter_hash_resolved": ph_res, "manifest_fingerprint_resolved": fp_res}


def attest_record(self_tests: dict, profile: dict, resolved) -> dict:
    arts = {e["name"]: e["sha256"] for e in resolved.artifact_entries}
    mp = profile["math_profile"]
    return {
        **{k: bool(v) for k, v in self_tests.items()},
        "math_profile_id": mp["math_profile_id"],
        "profile_functions": sorted(str(f) for f in (mp.get("functions") or [])),
        "numeric_policy_sha256": arts.get("numeric_policy"),
        "math_profile_sha256": arts.get("math_profile"),
        "sum_policy": "serial_neumaier",
        "transcendentals": "python math (libm), distinct values only",
    }


# ============================================================================================
# run
# ============================================================================================


def _schema(dataset_id: str) -> Path:
    return SCHEMA_DIR / f"{dataset_id}.schema.json"


LINEAGE_COLS = ("parameter_hash", "produced_by_fingerprint")


def check_table(dataset_id: str, table: pa.Table) -> None:
    """Validate an S0 table against its schema before publishing (``E_SCHEMA_INVALID`` otherwise).

    The lineage columns hold one value by construction (:func:`_const`): that value is validated once on a
    one-row slice instead of 10^6 identical 64-character strings; every other column is validated in full.
    Rows must be strictly ascending in ``merchant_id`` (the writer sort), checked here so the writer need not
    re-sort.
    """
    from engine.core.schema import load_schema, validate_table

    sp = _schema(dataset_id)
    sch = load_schema(sp)
    lin = [c for c in LINEAGE_COLS if c in table.column_names]
    body = dict(sch, required=[c for c in sch["required"] if c not in lin],
                properties={k: v for k, v in sch["properties"].items() if k not in lin})
    head = dict(sch, required=lin, properties={k: sch["properties"][k] for k in lin})
    problems = validate_table(table.drop_columns(lin), body)
    if table.num_rows:
        problems += validate_table(table.select(lin).slice(0, 1), head)
    mid = np.asarray(table.column("merchant_id").to_numpy(), dtype=np.uint64)
    if mid.size > 1 and not bool(np.all(mid[1:] > mid[:-1])):
        problems.append("merchant_id not strictly ascending")
    if problems:  # our own output must satisfy its contract; never publish otherwise
        raise ModelError("E_SCHEMA_INVALID", f"{dataset_id} does not match its schema", path=sp, rows=problems)


def _publish_table(ctx, dataset_id: str, table: pa.Table) -> None:
    from engine.core import publish
    from engine.core.schema import arrow_schema

    # rows are already in writer order (checked by check_table), so no re-sort of 10^6-row string columns
    with publish.staged(ctx.path(dataset_id), PUBLISH_CODE) as tmp:
        publish.write_parquet(table, Path(tmp) / "part-00000.parquet", sort_by=None,
                              schema=arrow_schema(_schema(dataset_id)))


def _check_records(rec: dict) -> None:
    """The JSON outputs must satisfy their own contracts before anything is published."""
    from engine.core.schema import validate_record

    problems = [f"sealed_inputs_1A[{i}]: {p}" for i, r in enumerate(rec["sealed"])
                for p in validate_record(r, _schema("sealed_inputs_1A"))]
    problems += [f"s0_gate_receipt: {p}" for p in validate_record(rec["receipt"], _schema("s0_gate_receipt_1A"))]
    if problems:
        raise ModelError("E_SCHEMA_INVALID", "S0 receipt / sealed inputs do not match their schemas", rows=problems)


def resolve_and_check(ctx):
    """Re-resolve the identities from the configured files and require them to equal ``ctx.ids``."""
    from engine.core import identities

    r = identities.resolve_1a(ctx.config, ctx.repo_root, None)
    if r.parameter_hash != ctx.ids.parameter_hash or r.manifest_fingerprint != ctx.ids.manifest_fingerprint:
        raise IdentityError(
            "E_ARTIFACT_RACE",
            "the configured inputs no longer hash to this run's identities (a file changed after the run was planned)",
            detail={"planned": {"parameter_hash": ctx.ids.parameter_hash,
                                "manifest_fingerprint": ctx.ids.manifest_fingerprint},
                    "now": {"parameter_hash": r.parameter_hash, "manifest_fingerprint": r.manifest_fingerprint}},
        )
    return r


def run(ctx) -> None:
    """S0's fingerprint-scoped part: validate, compute and publish every S0 dataset, receipt and sealed list.

    The seed-scoped RNG audit row and anchor event are :func:`run_rng_anchor` (its own Snakemake rule).
    """
    from engine.core import publish

    # identities first (00-core 7.2 steps 5-8), then numeric self-tests, then inputs
    resolved = resolve_and_check(ctx)
    self_tests = numeric_self_tests()
    check_numeric(self_tests)
    ins = ctx.config["segment1a"]["inputs"]
    profile = load_numeric_profile(ins["numeric_policy"], ins["math_profile"])
    si = load_s0_inputs(ctx.config)
    out = compute_s0(si, ctx.ids.parameter_hash, ctx.ids.manifest_fingerprint)

    attest = attest_record(self_tests, profile, resolved)
    rec = lineage_records(resolved, attest, out.counts, dict(resolved.options))
    _check_records(rec)
    tables = (("hurdle_design_matrix", out.design), ("hurdle_pi_probs", out.pi),
              ("crossborder_eligibility_flags", out.flags), ("crossborder_features", out.features),
              ("merchant_abort_log", out.abort_log))
    for ds, tab in tables:
        check_table(ds, tab)

    # every check passed: publish (write-once; identical bytes are a no-op)
    with publish.staged(ctx.path("sealed_inputs_1A"), PUBLISH_CODE) as tmp:
        publish.write_json(rec["sealed"], Path(tmp) / "sealed_inputs_1A.json")
    for ds, tab in tables:
        _publish_table(ctx, ds, tab)
    with publish.staged(ctx.path("s0_gate_receipt_1A"), PUBLISH_CODE) as tmp:
        t = Path(tmp)
        publish.write_json(rec["receipt"], t / "s0_gate_receipt.json")
        (t / "param_digest_log.jsonl").write_bytes(_jsonl(rec["param_digest_log"]))
        (t / "fingerprint_artifacts.jsonl").write_bytes(_jsonl(rec["fingerprint_artifacts"]))
        publish.write_json(rec["parameter_hash_resolved"], t / "parameter_hash_resolved.json")
        publish.write_json(rec["manifest_fingerprint_resolved"], t / "manifest_fingerprint_resolved.json")
        publish.write_json(attest, t / "numeric_policy_attest.json")



def run_rng_anchor(ctx) -> None:
    """S0's seed-scoped part: the run's RNG audit row and the non-consuming ``anchor`` event (00-core 3.7).

    Separate from :func:`run` because these logs live under ``seed=/parameter_hash=/run_id=`` while S0's data
    are fingerprint-scoped: a new seed re-runs only this step (decision 13). It reads the published receipt
    (S0 must have passed) and takes the code digest recorded there as ``build_commit`` (decision 3). Both
    writes are idempotent for the run (the audit row is not duplicated; the anchor part is replaced).
    """
    from engine.core import rng
    from engine.core.rnglog import RngLogs

    rp = ctx.path("s0_gate_receipt_1A") / "s0_gate_receipt.json"
    try:
        receipt = json.loads(rp.read_bytes())
    except (OSError, ValueError) as e:
        raise InputError("E_UPSTREAM_MISSING", f"S0 gate receipt not readable: {e}", path=rp) from e
    if receipt.get("manifest_fingerprint") != ctx.ids.manifest_fingerprint or \
            receipt.get("parameter_hash") != ctx.ids.parameter_hash:
        raise InputError("E_PATH_EMBED_MISMATCH", "S0 receipt identities differ from this run's", path=rp,
                         detail={"receipt": {k: receipt.get(k) for k in ("manifest_fingerprint", "parameter_hash")}})
    M = rng.master_material("1A", ctx.ids.fingerprint_bytes, ctx.ids.seed)
    k_root, hi_root, lo_root = rng.root(M)
    logs = RngLogs(ctx.data_root, "1A", ctx.ids, ctx.config)
    logs.write_audit(algorithm=rng.ALGORITHM, build_commit=receipt["code_digest"], code_digest=receipt["code_digest"],
                     rng_key=int(k_root), rng_counter_hi=int(hi_root), rng_counter_lo=int(lo_root))
    z = np.zeros(1, dtype=np.uint64)
    logs.add_events(ANCHOR_FAMILY, MODULE, ANCHOR_LABEL,
                    {"before_hi": z, "before_lo": z, "after_hi": z, "after_lo": z, "blocks": z, "draws": z})
    logs.close()
