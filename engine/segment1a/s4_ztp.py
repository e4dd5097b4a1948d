"""1A S4 — foreign-country count target ``K_target`` via a zero-truncated Poisson (logs only).

Spec: ``1A-S1-S4.md`` §4 (README decisions 7, 8, 18, 23). S4 writes RNG events and a metrics log, no
Parquet. Per in-scope merchant (ascending ``merchant_id``):

* **scope** = ``is_multi`` (S1 ``hurdle_bernoulli``) and ``is_eligible`` (S0 ``crossborder_eligibility_flags``,
  §6 C11). Single-site and ineligible merchants get **no S4 event at all** (downstream: K = 0, domestic).
* ``λ = exp(Neumaier(θ0·1, θ1·ln N, θ2·X))`` in ``theta_order`` (N from ``nb_final``, X = the merchant's
  ``crossborder_features.openness`` or the policy's ``x_default``; decision 23: 0.0 when neither exists);
  ``regime = inversion`` if λ < 10 else ``ptrs`` (decision 7).
* ``A`` = number of foreign rows of the merchant in ``s3_candidate_set``. **A = 0** short-circuits (§4.3.4):
  no draw, one ``ztp_final{K_target=0, attempts=0}`` at the base counter (kept as the spec says, so that
  S6/S7/S9 find exactly one ``ztp_final`` per eligible multi-site merchant and ``attempts == 0 iff A == 0``).
* otherwise attempts ``a = 1..MAX`` on the merchant's ``poisson_component`` substream: a consuming
  ``poisson_component`` (``context = "ztp"``), a zero adds a non-consuming ``ztp_rejection``; the first
  ``k >= 1`` gives ``ztp_final{K_target = k, attempts = a}``. After MAX zeros the non-consuming
  ``ztp_retry_exhausted`` is **always** written (decision 18; ``aborted`` = policy is ``abort``), then
  ``downgrade_domestic`` writes ``ztp_final{K_target=0, attempts=MAX, exhausted=true}`` (merchant stays
  domestic) and ``abort`` writes no final and stops the run with ``ZTP_EXHAUSTED_ABORT`` after the logs
  are written (the events are the evidence).

All attempts of all merchants run in one vectorised kernel (``samplers.ztp_vec``: Poisson inversion / PTRS
per decision 7, bit-identical to the scalar ``samplers.ztp``); the event columns are then assembled with
numpy. Non-consuming rows sit at the counter reached by the preceding draw (before == after, blocks 0,
draws 0). ``K_target`` is never capped at A (S6 realises ``min(K_target, A)``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.core.numeric import neumaier_sum
from engine.core.errors import InputError, ModelError

MODULE = "1A.ztp_sampler"
LABEL = "poisson_component"
CONTEXT = "ztp"
REGIME_LIMIT = 10.0  # decision 7 / 00-core 3.5: inversion below, PTRS at or above (λ = 10 => ptrs)
POLICIES = ("abort", "downgrade_domestic")
THETA_TERMS = ("theta0_intercept", "theta1_log_n_sites", "theta2_openness")
S4_PART = 1  # poisson_component is shared with S2 (part 0); S4 writes part 1 (§4.4)


@dataclass(frozen=True)
class ZtpPolicy:
    theta_order: tuple[str, ...]
    theta: dict
    x_default: float
    max_zero_attempts: int
    exhaustion_policy: str
    feature_id: str = "openness"
    path: str | None = None


def ztp_policy(z: dict, path=None) -> ZtpPolicy:
    """From the normalised ``ztp`` block of ``inputs.load_crossborder_hyperparams`` (both upstream layouts).
    Re-checks what S4 depends on; defects -> ``POLICY_INVALID`` (run-scoped, §4.2)."""
    P = None if path is None else str(path)
    order = tuple(str(t) for t in z.get("theta_order", ()))
    theta = dict(z.get("theta", {}))
    if not order or sorted(order) != sorted(theta) or len(set(order)) != len(order) or set(order) - set(THETA_TERMS):
        raise InputError("POLICY_INVALID", "ztp theta_order must list known terms, each once, matching theta", path=P,
                         detail={"theta_order": list(order), "known": list(THETA_TERMS)})
    for k, v in theta.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise InputError("POLICY_INVALID", f"theta {k} must be a finite number", path=P)
    xd = z.get("x_default", 0.0)  # decision 23: 0.0 unless the policy says otherwise
    if isinstance(xd, bool) or not isinstance(xd, (int, float)) or not (0.0 <= float(xd) <= 1.0):
        raise InputError("POLICY_INVALID", "x_default must be a number in [0, 1]", path=P)
    mx = z.get("max_zero_attempts", 64)
    if isinstance(mx, bool) or not isinstance(mx, int) or mx < 1:
        raise InputError("POLICY_INVALID", "MAX_ZTP_ZERO_ATTEMPTS must be an integer >= 1", path=P)
    pol = z.get("exhaustion_policy", "downgrade_domestic")
    if pol not in POLICIES:
        raise InputError("POLICY_INVALID", f"ztp_exhaustion_policy must be one of {list(POLICIES)}, got {pol!r}", path=P)
    return ZtpPolicy(order, {k: float(v) for k, v in theta.items()}, float(xd), int(mx), str(pol),
                     str(z.get("feature_id", "openness")), P)


_neumaier = neumaier_sum  # serial Neumaier sum, fixed order (00-core 4)

def lambda_scalar(policy: ZtpPolicy, n: int, x: float) -> float:
    """λ for one (N, X): exact spec order with scalar binary64 ``math`` (numeric profile §0)."""
    terms = {"theta0_intercept": lambda: policy.theta["theta0_intercept"] * 1.0,
             "theta1_log_n_sites": lambda: policy.theta["theta1_log_n_sites"] * math.log(n),
             "theta2_openness": lambda: policy.theta["theta2_openness"] * x}
    eta = _neumaier(terms[t]() for t in policy.theta_order)
    try:
        return math.exp(eta)
    except OverflowError:
        return math.inf


def ztp_lambda(policy: ZtpPolicy, N: np.ndarray, X: np.ndarray) -> np.ndarray:
    """λ per merchant. The scalar formula runs once per distinct (N, X) pair (few) and is gathered."""
    N = np.asarray(N, dtype=np.int64)
    X = np.asarray(X, dtype=np.float64)
    if N.size == 0:
        return np.zeros(0, dtype=np.float64)
    ux, xinv = np.unique(X.view(np.uint64), return_inverse=True)  # exact bits as the key
    un, ninv = np.unique(N, return_inverse=True)
    pair = ninv.reshape(-1).astype(np.int64) * ux.size + xinv.reshape(-1)
    up, inv = np.unique(pair, return_inverse=True)
    uxf = ux.view(np.float64)
    vals = np.array([lambda_scalar(policy, int(un[p // ux.size]), float(uxf[p % ux.size])) for p in up.tolist()],
                    dtype=np.float64)
    return vals[inv.reshape(-1)]


@dataclass
class ZtpOutcome:
    """Per-merchant results (aligned with the input merchants) and event columns per family."""

    merchant_id: np.ndarray
    lam: np.ndarray
    regime: np.ndarray  # str: "inversion" | "ptrs"
    k_target: np.ndarray  # int64; 0 on downgrade, A == 0 and abort
    attempts: np.ndarray  # int64
    exhausted: np.ndarray  # bool
    aborted: np.ndarray  # bool (exhausted under policy abort: no ztp_final)
    events: dict  # family -> columns dict (rows ascending merchant_id, then attempt)


def _u64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.uint64)


def simulate(policy: ZtpPolicy, merchant_id: np.ndarray, lam: np.ndarray, A: np.ndarray,
             key: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> ZtpOutcome:
    """Pure S4 core over in-scope merchants (``merchant_id`` ascending, uint64). ``key, hi, lo`` are the
    merchants' ``poisson_component`` base substreams. Returns results and the four families' event columns."""
    from engine.core import samplers

    mid = _u64(merchant_id)
    n = mid.shape[0]
    lam = np.asarray(lam, dtype=np.float64)
    A = np.asarray(A, dtype=np.int64)
    bad = np.nonzero(~np.isfinite(lam) | (lam <= 0.0))[0]
    if bad.size:  # §4.3.2; decision 8: stops the run, nothing written
        raise ModelError("NUMERIC_INVALID", "lambda_extra is non-finite or <= 0",
                         rows=[f"merchant {int(mid[i])}: lambda={lam[i]!r}" for i in bad[:10]])
    regime = np.where(lam < REGIME_LIMIT, "inversion", "ptrs")  # fixed per merchant (§4.3.3)
    draw = A > 0
    d_idx = np.nonzero(draw)[0]
    k_target = np.zeros(n, dtype=np.int64)
    attempts = np.zeros(n, dtype=np.int64)
    exhausted = np.zeros(n, dtype=bool)
    fin_hi = _u64(hi).copy()
    fin_lo = _u64(lo).copy()
    if d_idx.size:
        r = samplers.ztp_vec(_u64(key)[d_idx], _u64(hi)[d_idx], _u64(lo)[d_idx], lam[d_idx],
                             max_zero_attempts=policy.max_zero_attempts)
        k_target[d_idx] = r["k_final"]
        attempts[d_idx] = r["attempts"]
        exhausted[d_idx] = r["exhausted"]
        fin_hi[d_idx] = r["hi_after"]
        fin_lo[d_idx] = r["lo_after"]
        arow = d_idx[np.asarray(r["att_row"], dtype=np.int64)]  # attempt rows -> merchant index
        att = {k: np.asarray(r[k]) for k in ("att_attempt", "att_k", "att_before_hi", "att_before_lo",
                                               "att_after_hi", "att_after_lo", "att_blocks", "att_draws")}
    else:
        arow = np.zeros(0, dtype=np.int64)
        att = {k: np.zeros(0, dtype=np.uint64 if ("hi" in k or "lo" in k or k in ("att_blocks", "att_draws")) else np.int64)
               for k in ("att_attempt", "att_k", "att_before_hi", "att_before_lo", "att_after_hi", "att_after_lo",
                         "att_blocks", "att_draws")}
    # rows come back in (row, attempt) order and rows are ascending merchant_id: already the writer order
    aborted = exhausted & (policy.exhaustion_policy == "abort")
    nat = arow.shape[0]
    ctx_col = np.full(nat, CONTEXT)
    ev: dict = {}
    ev["poisson_component"] = {
        "merchant_id": mid[arow], "before_hi": _u64(att["att_before_hi"]), "before_lo": _u64(att["att_before_lo"]),
        "after_hi": _u64(att["att_after_hi"]), "after_lo": _u64(att["att_after_lo"]),
        "blocks": _u64(att["att_blocks"]), "draws": _u64(att["att_draws"]),
        "context": ctx_col, "lambda": lam[arow], "k": np.asarray(att["att_k"], dtype=np.int64),
        "attempt": np.asarray(att["att_attempt"], dtype=np.int64),
    }
    z = np.nonzero(np.asarray(att["att_k"]) == 0)[0]
    zr = arow[z]
    ev["ztp_rejection"] = {
        "merchant_id": mid[zr], "before_hi": _u64(att["att_after_hi"])[z], "before_lo": _u64(att["att_after_lo"])[z],
        "after_hi": _u64(att["att_after_hi"])[z], "after_lo": _u64(att["att_after_lo"])[z],
        "blocks": np.zeros(z.size, np.uint64), "draws": np.zeros(z.size, np.uint64),
        "context": np.full(z.size, CONTEXT), "lambda_extra": lam[zr],
        "k": np.zeros(z.size, np.int64), "attempt": np.asarray(att["att_attempt"], dtype=np.int64)[z],
    }
    e = np.nonzero(exhausted)[0]
    ev["ztp_retry_exhausted"] = {  # decision 18: always, whatever the policy
        "merchant_id": mid[e], "before_hi": fin_hi[e], "before_lo": fin_lo[e], "after_hi": fin_hi[e],
        "after_lo": fin_lo[e], "blocks": np.zeros(e.size, np.uint64), "draws": np.zeros(e.size, np.uint64),
        "context": np.full(e.size, CONTEXT), "lambda_extra": lam[e], "attempts": attempts[e],
        "aborted": aborted[e],
    }
    f = np.nonzero(~aborted)[0]
    ev["ztp_final"] = {
        "merchant_id": mid[f], "before_hi": fin_hi[f], "before_lo": fin_lo[f], "after_hi": fin_hi[f],
        "after_lo": fin_lo[f], "blocks": np.zeros(f.size, np.uint64), "draws": np.zeros(f.size, np.uint64),
        "context": np.full(f.size, CONTEXT), "K_target": k_target[f], "lambda_extra": lam[f],
        "attempts": attempts[f], "regime": regime[f], "exhausted": exhausted[f],
    }
    return ZtpOutcome(mid, lam, regime, k_target, attempts, exhausted, aborted, ev)


def metrics(out: ZtpOutcome, A: np.ndarray, scope_counts: dict) -> dict:
    """``s4.*`` counters and histograms (§4.5, SHOULD)."""
    A = np.asarray(A)
    att = out.attempts

    def hist(v, edges):
        res = {}
        for lo, hi, name in edges:
            res[name] = int(np.count_nonzero((v >= lo) & (v <= hi)))
        return res

    m = {
        "s4.merchants_in_scope": int(out.merchant_id.size),
        "s4.accepted": int(np.count_nonzero((A > 0) & ~out.exhausted)),
        "s4.short_circuit_no_admissible": int(np.count_nonzero(A == 0)),
        "s4.downgrade_domestic": int(np.count_nonzero(out.exhausted & ~out.aborted)),
        "s4.aborted": int(np.count_nonzero(out.aborted)),
        "s4.exhausted": int(np.count_nonzero(out.exhausted)),
        "s4.attempts_total": int(att.sum()),
        "s4.rejections_total": int(out.events["ztp_rejection"]["merchant_id"].size),
        "s4.events.poisson_component": int(out.events["poisson_component"]["merchant_id"].size),
        "s4.events.ztp_rejection": int(out.events["ztp_rejection"]["merchant_id"].size),
        "s4.events.ztp_retry_exhausted": int(out.events["ztp_retry_exhausted"]["merchant_id"].size),
        "s4.events.ztp_final": int(out.events["ztp_final"]["merchant_id"].size),
        "s4.regime.inversion": int(np.count_nonzero(out.regime == "inversion")),
        "s4.regime.ptrs": int(np.count_nonzero(out.regime == "ptrs")),
        "s4.hist.attempts": hist(att, [(0, 0, "0"), (1, 1, "1"), (2, 2, "2"), (3, 5, "3_5"), (6, 10, "6_10"),
                                       (11, 2**62, "11_plus")]),
        "s4.hist.k_target": hist(out.k_target, [(0, 0, "0"), (1, 1, "1"), (2, 2, "2"), (3, 5, "3_5"),
                                                (6, 10, "6_10"), (11, 2**62, "11_plus")]),
    }
    m["s4.trace_rows"] = sum(v for k, v in m.items() if k.startswith("s4.events."))
    m.update({f"s4.not_in_scope.{k}": int(v) for k, v in scope_counts.items()})
    return m


# --------------------------------------------------------------------------------------------------
# inputs (hand-offs read through the dictionary) and run
# --------------------------------------------------------------------------------------------------


def _np(col, dtype):
    return np.asarray(col.to_numpy(zero_copy_only=False) if hasattr(col, "to_numpy") else col, dtype=dtype)


def _unique_by_merchant(mid: np.ndarray, vals: np.ndarray, what: str, code: str):
    o = np.argsort(mid, kind="stable")
    mid, vals = mid[o], vals[o]
    if mid.size > 1 and np.any(mid[1:] == mid[:-1]):
        raise InputError(code, f"more than one {what} per merchant",
                         rows=[int(x) for x in np.unique(mid[1:][mid[1:] == mid[:-1]])[:10]])
    return mid, vals


def _lookup(keys: np.ndarray, mids: np.ndarray, vals: np.ndarray):
    """vals for ``mids`` from sorted ``keys`` -> (values, found mask)."""
    pos = np.searchsorted(keys, mids)
    pos_c = np.minimum(pos, max(keys.size - 1, 0))
    found = (pos < keys.size) & (keys[pos_c] == mids) if keys.size else np.zeros(mids.size, dtype=bool)
    return (vals[pos_c] if keys.size else np.zeros(mids.size, dtype=vals.dtype)), found


def _read_param_table(ctx, dataset_id: str, columns) -> pa.Table:
    """Selected columns of a parameter-scoped S0 table, with path<->embed equality of parameter_hash."""
    from engine.core.errors import EngineError
    from engine.segment1a.s3_crossborder import read_partition_columns

    try:
        return read_partition_columns(ctx, dataset_id, columns, "E_UPSTREAM_GATE")
    except EngineError as e:
        if e.code == "ERR_S3_PARTITION_MISMATCH":
            raise InputError("PARTITION_MISMATCH", e.message, path=e.path, rows=e.rows) from None
        raise


def gather_inputs(ctx) -> dict:
    """Scope, N, X and A for this run, from the published hand-offs (dictionary paths only)."""
    from engine.core import rnglog
    from engine.segment1a import inputs
    from engine.segment1a.s3_crossborder import read_candidate_set

    params = ctx.config["segment1a"]["parameters"]
    hp_path = params["crossborder_hyperparams.yaml"]
    policy = ztp_policy(inputs.load_crossborder_hyperparams(hp_path).ztp, hp_path)

    h = rnglog.read_events(ctx.data_root, ctx.ids, "hurdle_bernoulli", columns=["merchant_id", "is_multi"],
                           config=ctx.config)
    h_mid, h_multi = _unique_by_merchant(_np(h["merchant_id"], np.uint64), _np(h["is_multi"], bool),
                                         "hurdle_bernoulli", "UPSTREAM_MISSING_S1")
    nb = rnglog.read_events(ctx.data_root, ctx.ids, "nb_final", columns=["merchant_id", "n_outlets"], config=ctx.config)
    n_mid, n_val = _unique_by_merchant(_np(nb["merchant_id"], np.uint64), _np(nb["n_outlets"], np.int64),
                                       "nb_final", "UPSTREAM_MISSING_S2")
    fl = _read_param_table(ctx, "crossborder_eligibility_flags", ["merchant_id", "is_eligible"])
    e_mid, e_val = _unique_by_merchant(_np(fl["merchant_id"], np.uint64), _np(fl["is_eligible"], bool),
                                       "eligibility flag", "E_UPSTREAM_GATE")

    multi = h_mid[h_multi]
    _, has_n = _lookup(n_mid, multi, n_val)
    if not has_n.all():
        raise InputError("UPSTREAM_MISSING_S2", "multi-site merchants without nb_final",
                         rows=[int(x) for x in multi[~has_n][:10]])
    single = h_mid[~h_multi]
    _, stray = _lookup(n_mid, single, n_val)
    _, known = _lookup(h_mid, n_mid, h_multi)
    if stray.any() or not known.all():
        raise InputError("BRANCH_PURITY", "nb_final for a merchant that is not multi-site",
                         rows=[int(x) for x in np.concatenate([single[stray], n_mid[~known]])[:10]])
    elig, has_flag = _lookup(e_mid, multi, e_val)
    if not has_flag.all():
        raise InputError("E_UPSTREAM_GATE", "multi-site merchants without a crossborder_eligibility_flags row",
                         path=ctx.path("crossborder_eligibility_flags"), rows=[int(x) for x in multi[~has_flag][:10]])
    scope = multi[elig]
    N, _ = _lookup(n_mid, scope, n_val)

    # openness X (decision 23: the policy's x_default, itself 0.0 unless set, when features are absent)
    X = np.full(scope.size, policy.x_default, dtype=np.float64)
    fpath = ctx.path("crossborder_features")
    if Path(fpath).exists():
        import pyarrow.parquet as pq

        parts = sorted(Path(fpath).glob("part-*.parquet"))
        if parts and policy.feature_id not in pq.ParquetFile(parts[0]).schema_arrow.names:
            raise InputError("POLICY_INVALID", f"crossborder_features has no column {policy.feature_id!r}", path=fpath)
        ft = _read_param_table(ctx, "crossborder_features", ["merchant_id", policy.feature_id])
        fcol = pc.cast(ft[policy.feature_id], pa.float64())
        present = ~_np(pc.is_null(fcol), bool)  # a null feature counts as absent (x_default); NaN fails below
        f_mid, f_val = _unique_by_merchant(_np(ft["merchant_id"], np.uint64)[present],
                                           _np(pc.drop_null(fcol), np.float64),
                                           "crossborder_features row", "POLICY_INVALID")
        xv, has_x = _lookup(f_mid, scope, f_val)
        X = np.where(has_x, xv, X)
    badx = ~np.isfinite(X) | (X < 0.0) | (X > 1.0)
    if badx.any():  # §4.3.1: fail closed rather than clamp
        raise InputError("POLICY_INVALID", "openness feature outside [0, 1]", path=fpath,
                         rows=[f"merchant {int(m)}: X={x!r}" for m, x in zip(scope[badx][:10], X[badx][:10])])

    cand = read_candidate_set(ctx, ("merchant_id", "is_home"), "UPSTREAM_MISSING_A")
    c_mid = _np(cand["merchant_id"], np.uint64)  # sorted by (merchant_id, candidate_rank)
    c_home = _np(cand["is_home"], bool)
    starts = np.flatnonzero(np.r_[True, c_mid[1:] != c_mid[:-1]]) if c_mid.size else np.zeros(0, np.int64)
    um = c_mid[starts]
    foreign = np.add.reduceat((~c_home).astype(np.int64), starts) if starts.size else np.zeros(0, np.int64)
    A, has_c = _lookup(um, scope, foreign.astype(np.int64))
    if not has_c.all():
        raise InputError("UPSTREAM_MISSING_A", "in-scope merchants without s3_candidate_set rows",
                         rows=[int(x) for x in scope[~has_c][:10]])
    return {"policy": policy, "merchant_id": scope, "N": N, "X": X, "A": A,
            "scope_counts": {"single_site": int(single.size), "ineligible": int(np.count_nonzero(~elig))}}


def _write_metrics(ctx, m: dict) -> None:
    p = Path(ctx.path("s4_metrics_log"))
    p.parent.mkdir(parents=True, exist_ok=True)
    ident = {"seed": ctx.ids.seed, "parameter_hash": ctx.ids.parameter_hash, "run_id": ctx.ids.run_id,
             "manifest_fingerprint": ctx.ids.manifest_fingerprint}
    lines = [json.dumps({**ident, "metric": k, "value": m[k]}, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
             for k in sorted(m)]
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="ascii") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)  # a re-run replaces the run's metrics (ops log, never appended twice)


def run(ctx) -> None:
    from engine.core import rng, rnglog

    g = gather_inputs(ctx)
    policy = g["policy"]
    lam = ztp_lambda(policy, g["N"], g["X"])
    M = rng.master_material(ctx.segment, ctx.ids.fingerprint_bytes, ctx.ids.seed)
    key, hi, lo = rng.substreams_vec(M, "1A", LABEL, rng.merchant_u64_vec(g["merchant_id"]))
    out = simulate(policy, g["merchant_id"], lam, g["A"], key, hi, lo)

    logs = rnglog.RngLogs(ctx.data_root, ctx.segment, ctx.ids, ctx.config)
    for fam in ("poisson_component", "ztp_rejection", "ztp_retry_exhausted", "ztp_final"):
        cols = out.events[fam]
        if cols["merchant_id"].size == 0:  # no zero-row files (§0 write discipline)
            continue
        if fam == "poisson_component":
            logs.add_events(fam, MODULE, LABEL, cols, part=S4_PART)
        else:
            logs.add_events(fam, MODULE, LABEL, cols)
    logs.close()
    _write_metrics(ctx, metrics(out, g["A"], g["scope_counts"]))
    if out.aborted.any():
        ab = out.merchant_id[out.aborted]
        raise ModelError("ZTP_EXHAUSTED_ABORT",
                         f"{ab.size} merchant(s) drew {policy.max_zero_attempts} zeros and the policy is 'abort' "
                         "(ztp_retry_exhausted written; no ztp_final)", path=policy.path,
                         rows=[int(x) for x in ab[:10]], detail={"merchants_aborted": int(ab.size)})
