"""1A S7 — integer allocation of N over {home} ∪ selected foreigns (1A-S5-S9 §4, §7; decisions 6, 10).

Per merchant with a ``ztp_final``: domain D = home ∪ S6 members (S3 order), shares
``s_i = w_i / Σw`` from the S5 weights of the merchant's currency (0 where absent), targets
``a_i = N·s_i``, floors ``f_i``, residuals quantised to ``dp_resid`` (8) decimals, the remainder
``d = N − Σf`` goes one by one to the countries first in (residual ↓, ISO A→Z, candidate_rank ↑)
order. One non-consuming ``residual_rank`` event per country of D.

Scope (⚑18 HEAD, decision 6): every merchant gets rows in the hand-off ``s7_integer_allocation``:
single-site merchants ``(home, 1)``; multi-site merchants without a ``ztp_final`` (cross-border
ineligible) or with D = {home} get ``(home, N)`` (DEG_SINGLE_COUNTRY: residual 0, rank 1).
Only merchants with a ``ztp_final`` emit ``residual_rank`` events (S9 checks them).

Optional lanes (policy ``s7_integerisation_policy.yaml``, all off by default — decision 10):
``home_bias_lane`` (home-share floor by N tier), ``bounds_lane`` and ``dirichlet_lane`` (an audit-only
``dirichlet_gamma_vector`` event per merchant; it never changes counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from engine.core.errors import InputError, ModelError
from engine.segment1a.s5_currency_weights import is_int, is_number, load_strict_yaml, schema_path
from engine.segment1a.s6_foreign_selection import (
    col_bool,
    col_u64,
    iso_list,
    iso_strings,
    load_candidate_set,
    load_nb_final,
    load_ztp_final,
    lookup,
    merchant_u64_rows,
    position_in_group,
    read_family,
    read_merchant_homes,
    segment_sum,
)

MODULE = "1A.integerisation"
LABEL = "residual_rank"
FAMILY = "residual_rank"
HOME_BIAS_EPS = 1e-12  # §4.2 step 4 tolerances


# --------------------------------------------------------------------------------------------
# policy
# --------------------------------------------------------------------------------------------


@dataclass
class IntegerisationPolicy:
    path: str | None = None
    dp_resid: int = 8
    dirichlet_enabled: bool = False
    alpha0: float | None = None
    bounds_enabled: bool = False
    lower_multiplier: float = 1.0
    upper_multiplier: float = 1.0
    home_bias_enabled: bool = False
    tiers: list[tuple[int, float]] = field(default_factory=list)


def parse_integerisation_policy(doc: Any, path: str | None) -> IntegerisationPolicy:
    """Validate ``s7_integerisation_policy.yaml`` (§4.1 schematic; ⚑6: dp_resid is the constant 8)."""
    if not isinstance(doc, dict):
        raise InputError("E_POLICY_SCHEMA", "S7 policy must be a mapping", path=path)
    errs: list[str] = []
    allowed = {"policy_semver", "policy_version", "dp_resid", "dirichlet_lane", "bounds_lane", "home_bias_lane"}
    for k in doc:
        if k not in allowed:
            errs.append(f"unknown top-level key {k!r}")
    for k in ("policy_semver", "policy_version", "dp_resid"):
        if k not in doc:
            errs.append(f"missing required key {k!r}")
    for k in ("policy_semver", "policy_version"):
        if k in doc and not isinstance(doc[k], str):
            errs.append(f"{k} must be a string")
    if "dp_resid" in doc and not (is_int(doc["dp_resid"]) and doc["dp_resid"] == 8):
        errs.append(f"dp_resid must be the constant 8, got {doc['dp_resid']!r}")
    pol = IntegerisationPolicy(path=path)

    def lane(name: str, keys: set[str]) -> dict:
        b = doc.get(name)
        if b is None:
            return {}
        if not isinstance(b, dict):
            errs.append(f"{name} must be a mapping")
            return {}
        for k in b:
            if k not in keys:
                errs.append(f"{name}: unknown key {k!r}")
        if "enabled" in b and not isinstance(b["enabled"], bool):
            errs.append(f"{name}.enabled must be a boolean")
        return b

    dl = lane("dirichlet_lane", {"enabled", "alpha0"})
    if dl.get("enabled") is True:
        pol.dirichlet_enabled = True
        a0 = dl.get("alpha0")
        if not (is_number(a0) and float(a0) > 0):
            errs.append("dirichlet_lane.alpha0 must be a number > 0 when the lane is enabled")
        else:
            pol.alpha0 = float(a0)
    bl = lane("bounds_lane", {"enabled", "lower_multiplier", "upper_multiplier"})
    if bl.get("enabled") is True:
        pol.bounds_enabled = True
        lo, hi = bl.get("lower_multiplier", 1.0), bl.get("upper_multiplier", 1.0)
        if not (is_number(lo) and is_number(hi) and 0 <= float(lo) <= float(hi)):
            errs.append("bounds_lane multipliers must be numbers with 0 <= lower <= upper")
        else:
            pol.lower_multiplier, pol.upper_multiplier = float(lo), float(hi)
    hb = lane("home_bias_lane", {"enabled", "tiers"})
    if hb.get("enabled") is True:
        pol.home_bias_enabled = True
        tiers = hb.get("tiers")
        if not (isinstance(tiers, list) and tiers):
            errs.append("home_bias_lane.tiers must be a non-empty list when the lane is enabled")
        else:
            last = 0
            for i, t in enumerate(tiers):
                if not (isinstance(t, dict) and set(t) == {"max_n_outlets", "home_share_min"}):
                    errs.append(f"home_bias_lane.tiers[{i}] must have exactly max_n_outlets, home_share_min")
                    continue
                mx, hs = t["max_n_outlets"], t["home_share_min"]
                if not (is_int(mx) and mx > last):
                    errs.append(f"home_bias_lane.tiers[{i}].max_n_outlets must increase strictly")
                elif not (is_number(hs) and 0.0 <= float(hs) <= 1.0):
                    errs.append(f"home_bias_lane.tiers[{i}].home_share_min must be in [0,1]")
                else:
                    pol.tiers.append((int(mx), float(hs)))
                    last = mx
    if errs:
        raise InputError("E_POLICY_SCHEMA", "S7 integerisation policy does not match its schema", path=path, rows=errs)
    return pol


def load_integerisation_policy(ctx) -> IntegerisationPolicy:
    p = ctx.config["segment1a"]["parameters"]["s7_integerisation_policy.yaml"]
    return parse_integerisation_policy(load_strict_yaml(p, "E_POLICY_SCHEMA"), p)


# --------------------------------------------------------------------------------------------
# compute (pure)
# --------------------------------------------------------------------------------------------


def quantise_residual(x: np.ndarray, dp: int = 8) -> np.ndarray:
    """§4.2 step 5: ``round_half_even(x·10^dp)/10^dp``; (−1e-8, 0) -> 0; [1, 1+1e-8) -> 0.99999999."""
    S = float(10**dp)
    q = np.rint(np.asarray(x, dtype=np.float64) * S) / S
    top = (S - 1.0) / S
    q = np.where((q < 0) & (q > -1.0 / S), 0.0, q)
    q = np.where((q >= 1.0) & (q < 1.0 + 1.0 / S), top, q)
    if np.any((q < 0) | (q >= 1.0)) or np.any(~np.isfinite(q)):
        raise ModelError("E_RESIDUAL_QUANTISATION", "residual outside [0,1) after quantisation")
    return q


@dataclass
class Allocation:
    count: np.ndarray
    residual: np.ndarray
    residual_rank: np.ndarray
    target: np.ndarray  # a_i (diagnostics, tests)
    share: np.ndarray


def allocate(
    group: np.ndarray,
    N: np.ndarray,
    w: np.ndarray,
    is_home: np.ndarray,
    iso: np.ndarray,
    cand_rank: np.ndarray,
    policy: IntegerisationPolicy | None = None,
) -> Allocation:
    """§4.2 steps 3-10 over flat rows grouped by merchant (``group`` = dense merchant index,
    rows of one merchant contiguous in D order; ``N`` per group; ``w`` cache weights)."""
    policy = policy or IntegerisationPolicy()
    n = group.shape[0]
    ng = N.shape[0]
    group = np.asarray(group, dtype=np.int64)
    if n == 0:
        z = np.zeros(0)
        return Allocation(z.astype(np.int64), z, z.astype(np.int32), z, z)
    size = np.bincount(group, minlength=ng)
    # step 3: shares
    T = segment_sum(w, group, ng)
    bad = (size > 0) & ~(T > 0)
    if np.any(bad):
        raise ModelError("E_ZERO_SUPPORT", "sum of weights over D is not positive", rows=np.nonzero(bad)[0][:10].tolist())
    s = w / T[group]
    # step 4: home-bias lane
    if policy.home_bias_enabled and policy.tiers:
        mx = np.array([t[0] for t in policy.tiers], dtype=np.int64)
        hs = np.array([t[1] for t in policy.tiers], dtype=np.float64)
        ti = np.minimum(np.searchsorted(mx, N, side="left"), len(mx) - 1)
        h_star = hs[ti]
        s_home_old = segment_sum(np.where(is_home, s, 0.0), group, ng)
        cond = (size > 1) & (s_home_old < h_star - HOME_BIAS_EPS) & ((1.0 - s_home_old) > HOME_BIAS_EPS)
        cg = cond[group]
        scale = (1.0 - h_star) / np.where(cond, 1.0 - s_home_old, 1.0)
        s1 = np.where(cg, np.where(is_home, h_star[group], s * scale[group]), s)
        Z = segment_sum(s1, group, ng)
        s2 = np.where(cg, s1 / Z[group], s1)
        fix = 1.0 - segment_sum(s2, group, ng)
        s = np.where(cg & is_home, s2 + fix[group], s2)
    # step 5: targets, floors, quantised residuals
    a = N[group].astype(np.float64) * s
    f = np.floor(a)
    r = quantise_residual(a - f, policy.dp_resid)
    f = f.astype(np.int64)
    # step 6: bounds lane
    Ng = N[group].astype(np.int64)
    if policy.bounds_enabled:
        L = np.clip(np.floor(a * policy.lower_multiplier), 0, Ng).astype(np.int64)
        U = np.clip(np.ceil(a * policy.upper_multiplier), 0, Ng).astype(np.int64)
        if np.any(U < L):
            raise ModelError("E_BOUNDS_INFEASIBLE", "upper bound below lower bound",
                             rows=np.unique(group[U < L])[:10].tolist())
        sL = np.bincount(group, weights=L, minlength=ng)
        sU = np.bincount(group, weights=U, minlength=ng)
        inf = (size > 0) & ((sL > N) | (sU < N))
        if np.any(inf):
            raise ModelError("E_BOUNDS_INFEASIBLE", "sum of bounds does not bracket N", rows=np.nonzero(inf)[0][:10].tolist())
        b = np.maximum(f, L)
    else:
        b = f
    # step 7: remainder
    d = N.astype(np.int64) - np.bincount(group, weights=b, minlength=ng).astype(np.int64)
    if np.any(d < 0) or (not policy.bounds_enabled and np.any(d > size)):
        bad = np.nonzero((d < 0) | ((d > size) & (not policy.bounds_enabled)))[0]
        raise ModelError("INTEGER_SUM_MISMATCH", "remainder out of range", rows=bad[:10].tolist())
    # step 8: residual order: residual desc, ISO A→Z, candidate_rank asc, stable index
    o = np.lexsort((np.arange(n), cand_rank, iso, -r, group))
    go = group[o]
    pos = position_in_group(go)
    rank = np.empty(n, np.int32)
    rank[o] = (pos + 1).astype(np.int32)
    # step 9: bump the first d (bounds lane: of rows still below U)
    bump_sorted = np.zeros(n, np.int64)
    if policy.bounds_enabled:
        room = (b < U)[o]
        pos2 = np.full(n, n, np.int64)
        idx = np.nonzero(room)[0]
        pos2[idx] = position_in_group(go[idx])
        bump_sorted = (pos2 < d[go]).astype(np.int64)
        got = np.bincount(go, weights=bump_sorted, minlength=ng).astype(np.int64)
        if np.any(got != d):
            raise ModelError("E_BOUNDS_CAP_EXHAUSTED", "not enough room under the upper bounds",
                             rows=np.nonzero(got != d)[0][:10].tolist())
    else:
        bump_sorted = (pos < d[go]).astype(np.int64)
    bump = np.empty(n, np.int64)
    bump[o] = bump_sorted
    c = b + bump
    # step 10: checks
    sums = np.bincount(group, weights=c, minlength=ng).astype(np.int64)
    if np.any((size > 0) & (sums != N)):
        raise ModelError("INTEGER_SUM_MISMATCH", "allocated counts do not sum to N",
                         rows=np.nonzero((size > 0) & (sums != N))[0][:10].tolist())
    if np.any(c < 0) or np.any(np.abs(c - a) > 1.0):
        raise ModelError("INTEGER_SUM_MISMATCH", "count negative or further than 1 from its target",
                         rows=np.unique(group[(c < 0) | (np.abs(c - a) > 1.0)])[:10].tolist())
    if policy.bounds_enabled and (np.any(c < L) or np.any(c > U)):
        raise ModelError("E_BOUNDS_CAP_EXHAUSTED", "bounds violated")
    return Allocation(c, r, rank, a, s)


DIRICHLET_MODULE = "1A.dirichlet_allocator"
DIRICHLET_LABEL = "dirichlet_gamma_vector"
DIRICHLET_FAMILY = "dirichlet_gamma_vector"
DIRICHLET_SUM_TOL = 1e-6


def dirichlet_lane(group, merchants, N, share, iso, is_home, alpha0: float, M: bytes) -> dict | None:
    """§4.2 step 12 (audit lane; never changes counts): per merchant whose shares over D are all
    positive, ``g_i ~ Gamma(alpha0·s_i, 1)`` in D order on ONE keyed substream (label
    ``dirichlet_gamma_vector``, ids ``(merchant_u64)``; consecutive gammas continue the counter),
    ``weights = g / Σg``. Vectorised over merchants, one sampler call per position in D.

    ``group`` = dense merchant index per D row (rows of a merchant contiguous, home first);
    ``merchants``/``N`` per group. Returns the event columns (lists per merchant) or None.
    """
    from engine.core import rng, samplers

    ng = merchants.shape[0]
    if group.shape[0] == 0:
        return None
    size = np.bincount(group, minlength=ng)
    pos_ok = np.ones(ng, bool)
    np.logical_and.at(pos_ok, group, share > 0)
    take_m = (size > 0) & pos_ok
    if not take_m.any():
        return None
    rows = np.nonzero(take_m[group])[0]
    g = group[rows]
    alpha = alpha0 * share[rows]
    if np.any(~(alpha > 0)) or np.any(~np.isfinite(alpha)):
        raise ModelError("E_DIRICHLET_NONPOS", "Dirichlet alpha not positive",
                         rows=[int(merchants[x]) for x in np.unique(g[~(alpha > 0)])[:10]])
    ms = np.nonzero(take_m)[0]
    mpos = np.full(ng, -1, np.int64)
    mpos[ms] = np.arange(ms.shape[0])
    key, hi0, lo0 = rng.substreams_vec(M, "1A", DIRICHLET_LABEL, merchant_u64_rows(merchants[ms]))
    hi, lo = hi0.copy(), lo0.copy()
    blocks = np.zeros(ms.shape[0], np.uint64)
    draws = np.zeros(ms.shape[0], np.uint64)
    gam = np.empty(rows.shape[0], np.float64)
    pos = position_in_group(g)
    for j in range(int(pos.max()) + 1):
        r = np.nonzero(pos == j)[0]
        mm = mpos[g[r]]
        val, hi_a, lo_a, b, d = samplers.gamma_vec(key[mm], hi[mm], lo[mm], alpha[r])
        gam[r] = val
        hi[mm], lo[mm] = hi_a, lo_a
        blocks[mm] += b
        draws[mm] += d
    if np.any(~(gam > 0)):
        raise ModelError("E_DIRICHLET_NONPOS", "Dirichlet gamma component not positive",
                         rows=[int(merchants[x]) for x in np.unique(g[~(gam > 0)])[:10]])
    tot = segment_sum(gam, g, ng)
    w = gam / tot[g]
    wsum = segment_sum(w, g, ng)[ms]
    if np.any(np.abs(wsum - 1.0) > DIRICHLET_SUM_TOL):
        raise ModelError("E_DIRICHLET_SUM", "Dirichlet weights do not sum to 1")
    offsets = np.concatenate(([0], np.cumsum(size[ms]))).astype(np.int32)

    def lst(values, typ):
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, typ))

    home_codes = iso[rows][is_home[rows]]
    return {
        "merchant_id": merchants[ms],
        "before_hi": hi0, "before_lo": lo0, "after_hi": hi, "after_lo": lo,
        "blocks": blocks, "draws": draws,
        "home_country_iso": iso_strings(home_codes),
        "country_isos": pa.ListArray.from_arrays(pa.array(offsets), iso_strings(iso[rows])),
        "alpha": lst(alpha, pa.float64()),
        "gamma_raw": lst(gam, pa.float64()),
        "weights": lst(w, pa.float64()),
        "n_domestic": N[ms].astype(np.int64),
    }


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------


def _merchant_homes(ctx) -> tuple[np.ndarray, np.ndarray]:
    """The run's merchants (ascending) with their home ISO code: S0's ``hurdle_design_matrix``."""
    return read_merchant_homes(ctx)


def multi_site(merchants: np.ndarray, nb_mid: np.ndarray) -> np.ndarray:
    """S1 outcome per merchant, as the presence of an ``nb_final``.

    S2 writes exactly one ``nb_final`` for every merchant the hurdle made multi-site and stops the
    run otherwise (decision 8), so this equals ``hurdle_bernoulli.is_multi`` without parsing one
    hurdle event per merchant; S9 re-checks the equivalence (``E_S2_FINAL_MISSING_OR_DUP``).
    """
    _, found = lookup(nb_mid, merchants)
    _, known = lookup(merchants, nb_mid)
    if not np.all(known):
        raise InputError("E_UPSTREAM_MISSING", "nb_final for a merchant outside the run's merchant universe",
                         rows=[int(x) for x in nb_mid[~known][:10]])
    return found


def load_is_multi(ctx, merchants: np.ndarray) -> np.ndarray:
    """S1 outcome from the ``hurdle_bernoulli`` events (one per merchant); kept for validators/tests."""
    t = read_family(ctx, "hurdle_bernoulli")
    mid = col_u64(t, "merchant_id")
    im = col_bool(t, "is_multi")
    o = np.argsort(mid, kind="stable")
    mid, im = mid[o], im[o]
    if mid.shape[0] and np.any(mid[1:] == mid[:-1]):
        raise InputError("E_UPSTREAM_MISSING", "duplicate hurdle_bernoulli events",
                         rows=[int(x) for x in np.unique(mid[1:][mid[1:] == mid[:-1]])[:10]])
    pos, found = lookup(mid, merchants)
    if not np.all(found):
        raise InputError("E_UPSTREAM_MISSING", "merchants without a hurdle_bernoulli event",
                         rows=[int(x) for x in merchants[~found][:10]])
    return im[pos]


def load_aborted(ctx) -> np.ndarray:
    ex = read_family(ctx, "ztp_retry_exhausted", required=False)
    if ex is None or ex.num_rows == 0:
        return np.empty(0, np.uint64)
    ab = col_bool(ex, "aborted") if "aborted" in ex.column_names else np.ones(ex.num_rows, bool)
    return np.unique(col_u64(ex, "merchant_id")[ab])


@dataclass
class HandOff:
    merchant_id: np.ndarray
    iso: np.ndarray
    count: np.ndarray
    residual: np.ndarray
    residual_rank: np.ndarray
    is_home: np.ndarray

    def table(self) -> pa.Table:
        return pa.table({
            "merchant_id": pa.array(self.merchant_id, pa.uint64()),
            "country_iso": iso_strings(self.iso),
            "count": pa.array(self.count, pa.int64()),
            "residual": pa.array(self.residual, pa.float64()),
            "residual_rank": pa.array(self.residual_rank, pa.int32()),
            "is_home": pa.array(self.is_home, pa.bool_()),
        })


def build_domain(z_mid, z_K, c_mid, c_iso, c_rank, c_home, mem_mid, mem_iso):
    """Rows of D per ztp_final merchant, in (merchant, candidate_rank) order (§4.2 steps 1-2)."""
    nz = z_mid.shape[0]
    # gates on membership
    mpos, mfound = lookup(z_mid, mem_mid)
    if not np.all(mfound):
        raise InputError("E_UPSTREAM_GATE", "S6 members for a merchant without ztp_final",
                         rows=[int(x) for x in mem_mid[~mfound][:10]])
    n_mem = np.bincount(mpos, minlength=nz)
    over = n_mem > z_K
    if np.any(over):
        raise InputError("E_UPSTREAM_GATE", "more S6 members than K_target (or members with K_target = 0)",
                         rows=[int(x) for x in z_mid[over][:10]])
    ci, cf = lookup(z_mid, c_mid)
    keep = cf
    r_g = ci[keep]
    r_iso = c_iso[keep].astype(np.int64)
    r_rank = c_rank[keep]
    r_home = c_home[keep]
    mem_key = np.sort(mpos.astype(np.int64) * 676 + mem_iso.astype(np.int64))
    row_key = r_g.astype(np.int64) * 676 + r_iso
    _, is_mem = lookup(mem_key, row_key)
    # every member must be a foreign S3 candidate of its merchant
    _, mem_in_s3 = lookup(np.sort(row_key[~r_home]), mem_key)
    if not np.all(mem_in_s3):
        bad = mem_key[~mem_in_s3]
        raise InputError("E_S6_NOT_SUBSET_S3", "S6 member not among the merchant's S3 foreign candidates",
                         rows=[f"{int(z_mid[k // 676])}:{iso_list([k % 676])[0]}" for k in bad[:10]])
    has_home = np.zeros(nz, bool)
    has_home[r_g[r_home]] = True
    if not np.all(has_home):
        raise InputError("E_UPSTREAM_MISSING", "merchant with ztp_final but no S3 home row",
                         rows=[int(x) for x in z_mid[~has_home][:10]])
    inD = r_home | (is_mem & ~r_home)
    return r_g[inD], r_iso[inD].astype(np.int16), r_rank[inD], r_home[inD]


def compute_handoff(
    merchants, home, is_multi, nb_mid, nb_N, z_mid, z_K, aborted, cand, mem, kappa_of, weight_of, policy
):
    """Assemble the S7 hand-off for every merchant plus the residual_rank event rows.

    ``kappa_of(z_idx) -> κ index`` and ``weight_of(κ_idx, iso) -> (w, found)`` are callables so the
    compute stays independent of file formats.
    """
    c_mid, c_iso, c_rank, c_home = cand
    mem_mid, mem_iso = mem
    # multi-site merchants need an N
    multi = merchants[is_multi]
    _, has_N = lookup(nb_mid, multi)
    if not np.all(has_N):
        raise InputError("E_UPSTREAM_MISSING", "multi-site merchants without nb_final",
                         rows=[int(x) for x in multi[~has_N][:10]])
    _, nb_known = lookup(multi, nb_mid)
    if not np.all(nb_known):
        raise InputError("E_UPSTREAM_MISSING", "nb_final for a merchant that is not multi-site",
                         rows=[int(x) for x in nb_mid[~nb_known][:10]])
    zpos, zfound = lookup(nb_mid, z_mid)
    if not np.all(zfound):
        raise InputError("E_UPSTREAM_GATE", "ztp_final for a merchant without nb_final",
                         rows=[int(x) for x in z_mid[~zfound][:10]])
    zN = nb_N[zpos]

    # cross-check S3 home against the merchant table (order authority)
    s3h = c_home
    hp, hf = lookup(merchants, c_mid[s3h])
    if not np.all(hf):
        raise InputError("E_UPSTREAM_MISSING", "s3_candidate_set merchant not in the merchant table",
                         rows=[int(x) for x in c_mid[s3h][~hf][:10]])
    drift = home[hp] != c_iso[s3h]
    if np.any(drift):
        raise InputError("E_ORDER_AUTHORITY_DRIFT", "S3 home (rank 0) differs from the merchant's home_country_iso",
                         rows=[int(x) for x in c_mid[s3h][drift][:10]])

    # D rows for ztp_final merchants
    g, d_iso, d_rank, d_home = build_domain(z_mid, z_K, c_mid, c_iso, c_rank, c_home, mem_mid, mem_iso)
    size = np.bincount(g, minlength=z_mid.shape[0])
    kap = kappa_of(g)
    w, _found = weight_of(kap, d_iso)
    single_dom = size[g] == 1
    # DEG_SINGLE_COUNTRY needs no weights: give the lone home row weight 1
    w = np.where(single_dom, 1.0, w)
    alloc = allocate(g, zN, w, d_home, d_iso.astype(np.int64), d_rank, policy)

    # everyone else: (home, N) or (home, 1)
    _, has_z = lookup(z_mid, merchants)
    _, was_ab = lookup(aborted, merchants)
    rest = ~has_z & ~was_ab
    npos, _ = lookup(nb_mid, merchants)
    N_rest = np.where(is_multi, nb_N[npos] if nb_N.shape[0] else 0, 1)[rest]
    r_mid = merchants[rest]
    r_iso = home[rest]

    mid_all = np.concatenate([z_mid[g], r_mid])
    iso_all = np.concatenate([d_iso.astype(np.int16), r_iso.astype(np.int16)])
    cnt_all = np.concatenate([alloc.count, N_rest.astype(np.int64)])
    res_all = np.concatenate([alloc.residual, np.zeros(r_mid.shape[0])])
    rr_all = np.concatenate([alloc.residual_rank, np.ones(r_mid.shape[0], np.int32)])
    home_all = np.concatenate([d_home, np.ones(r_mid.shape[0], bool)])
    o = np.lexsort((iso_all, mid_all))
    hand = HandOff(mid_all[o], iso_all[o], cnt_all[o], res_all[o], rr_all[o], home_all[o])
    events = {
        "merchant_id": z_mid[g],
        "iso": d_iso,
        "residual": alloc.residual,
        "residual_rank": alloc.residual_rank,
        "group": g,
        "is_home": d_home,
        "N": zN,
        "z_mid": z_mid,
    }
    return hand, events, alloc


def run(ctx) -> None:
    from engine.core import publish, rng, rnglog
    from engine.core.schema import arrow_schema, validate_table
    from engine.segment1a.s5_currency_weights import read_weights
    from engine.segment1a.s6_foreign_selection import _weights_lookup, merchant_kappa, read_membership

    policy = load_integerisation_policy(ctx)
    wt = read_weights(ctx)  # S5 gate
    curs, cidx, w_keys, w_vals = _weights_lookup(wt)
    merchants, home = _merchant_homes(ctx)
    nb_mid, nb_N = load_nb_final(ctx)
    is_multi = multi_site(merchants, nb_mid)
    z_mid, z_K = load_ztp_final(ctx)
    aborted = load_aborted(ctx)
    cand = load_candidate_set(ctx)
    mem = read_membership(ctx)  # S6 gate
    kap_z = merchant_kappa(ctx, z_mid, cidx)

    def kappa_of(g):
        return kap_z[g]

    def weight_of(kap, iso):
        pos, found = lookup(w_keys, kap.astype(np.int64) * 676 + iso.astype(np.int64))
        return np.where(found, w_vals[pos] if w_vals.shape[0] else 0.0, 0.0), found

    hand, ev, alloc = compute_handoff(merchants, home, is_multi, nb_mid, nb_N, z_mid, z_K, aborted, cand, mem,
                                      kappa_of, weight_of, policy)
    M = rng.master_material("1A", ctx.ids.fingerprint_bytes, ctx.ids.seed)
    dirichlet = None
    if policy.dirichlet_enabled:
        dirichlet = dirichlet_lane(ev["group"], ev["z_mid"], ev["N"], alloc.share, ev["iso"].astype(np.int64),
                                   ev["is_home"], float(policy.alpha0), M)
    tbl = hand.table()
    probs = validate_table(tbl, schema_path(ctx, "s7_integer_allocation"))
    if probs:
        raise ModelError("E_SCHEMA_INVALID", "s7_integer_allocation does not match its schema", rows=probs)

    # residual_rank events: non-consuming, counters = base of the keyed (merchant, ISO) substream
    n = ev["merchant_id"].shape[0]
    mu = merchant_u64_rows(ev["merchant_id"])
    _key, hi, lo = rng.substreams_vec(M, "1A", LABEL, mu, iso=iso_list(ev["iso"]))
    cols = {
        "merchant_id": ev["merchant_id"],
        "before_hi": hi,
        "before_lo": lo,
        "after_hi": hi,
        "after_lo": lo,
        "blocks": np.zeros(n, np.uint64),
        "draws": np.zeros(n, np.uint64),
        "country_iso": iso_strings(ev["iso"]),
        "residual": ev["residual"],
        "residual_rank": ev["residual_rank"].astype(np.int64),
    }
    logs = rnglog.RngLogs(ctx.data_root, ctx.segment, ctx.ids)
    logs.add_events(FAMILY, MODULE, LABEL, cols)
    if dirichlet is not None:
        logs.add_events(DIRICHLET_FAMILY, DIRICHLET_MODULE, DIRICHLET_LABEL, dirichlet)
    logs.close()

    with publish.staged(ctx.path("s7_integer_allocation"), "E_IMMUTABLE_PARTITION_EXISTS_NONIDENTICAL") as tmp:
        publish.write_parquet(tbl, tmp / "part-00000.parquet", sort_by=["merchant_id", "country_iso"],
                              schema=arrow_schema(schema_path(ctx, "s7_integer_allocation")))


__all__ = ["run", "allocate", "quantise_residual", "parse_integerisation_policy", "compute_handoff", "build_domain",
           "dirichlet_lane", "multi_site", "load_is_multi", "IntegerisationPolicy"]
