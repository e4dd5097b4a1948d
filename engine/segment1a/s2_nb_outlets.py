"""1A S2 — negative-binomial total outlet count N >= 2 for multi-site merchants (1A-S1-S4 section 2).

Links (2.3): ``mu = exp(Neumaier(beta_mu_0, beta_mu_mcc, beta_mu_ch))``,
``phi = exp(Neumaier(beta_phi_0, beta_phi_mcc, beta_phi_ch, beta_phi_lngdp * ln g))`` (binary64; ``exp`` is
scalar ``math.exp`` on the distinct design levels). Non-finite or non-positive mu / phi -> run error
``ERR_S2_NUMERIC_INVALID`` (decision 8 makes it stop the run rather than skip the merchant).

Attempt loop (2.4), vectorised by attempt rounds over the merchants still active:
``G ~ Gamma(phi, 1)`` on substream ``gamma_nb`` (``gamma_component``, module ``1A.nb_and_dirichlet_sampler``,
``context="nb"``, ``index=0``, ``alpha=phi``, ``gamma_value=G``); ``lambda = (mu/phi) * G`` (ratio first;
checked finite and > 0 before anything is logged); ``K ~ Poisson(lambda)`` on substream ``poisson_nb``
(``poisson_component``, module ``1A.nb_poisson_component``, ``context="nb"``, ``lambda``, ``k``,
``attempt = t+1``). ``K >= 2`` accepts ``N = K`` with ``r = t`` rejections; otherwise both substreams continue.
One non-consuming ``nb_final`` per merchant (module ``1A.nb_sampler``, label ``nb_final``, counters = the
base counter of its ``nb_final`` substream, blocks 0, draws "0"; payload ``mu``, ``dispersion_k = phi``,
``n_outlets``, ``nb_rejections``).

Caps (decision 8): ``MAX_NB_ATTEMPTS = 10_000`` attempts per merchant -> ``ERR_S2_ATTEMPT_CAP``. With the
acceptance probability alpha_m = P(N >= 2) of 2.6 a legitimate merchant reaches it with probability
(1 - alpha_m)^10000, below 1e-40 for alpha_m >= 0.01; a model with alpha_m that small is a corridor failure
(2.8) anyway. ``N > 999_999`` (``site_order`` has 6 digits) -> ``ERR_S2_FINAL_INVALID_N``.

Every event is buffered and only handed to the RNG log writer after the whole state has succeeded, so a
failure leaves no partial S2 trail (2.4 "guard-before-emit"). The Poisson events go to part 0 of the
shared ``poisson_component`` stream (S4 writes part 1).

:func:`corridor_metrics` computes the run-level corridors of 2.6 (called by S9).
"""

from __future__ import annotations

import math

import numpy as np

from engine.core.errors import InputError, ModelError
from engine.segment1a import inputs as inp
from engine.segment1a import s0_foundations as s0
from engine.segment1a import s1_hurdle as s1

GAMMA_FAMILY, GAMMA_MODULE, GAMMA_LABEL = "gamma_component", "1A.nb_and_dirichlet_sampler", "gamma_nb"
POISSON_FAMILY, POISSON_MODULE, POISSON_LABEL = "poisson_component", "1A.nb_poisson_component", "poisson_nb"
FINAL_FAMILY, FINAL_MODULE, FINAL_LABEL = "nb_final", "1A.nb_sampler", "nb_final"
POISSON_PART = 0  # S4 writes part 1 of poisson_component

MAX_NB_ATTEMPTS = 10_000
SITE_LIMIT = 999_999  # site_order is 6 digits (1A-S5-S9 outlet_catalogue)


# ============================================================================================
# links
# ============================================================================================


def nb_links(hc: inp.HurdleCoefficients, dc: inp.DispersionCoefficients, mcc_idx, ch_idx, ln_g, *,
             merchant_id=None) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, phi)`` per merchant (2.3). ``ERR_S2_NUMERIC_INVALID`` if either is non-finite or <= 0."""
    C = hc.n_mcc
    mcc_idx = np.asarray(mcc_idx, dtype=np.int64)
    ch_idx = np.asarray(ch_idx, dtype=np.int64)
    ln_g = np.asarray(ln_g, dtype=np.float64)
    bm, bp = hc.beta_mu, dc.beta_phi
    # mu: one value per (mcc, channel) level
    kmu = mcc_idx * 2 + ch_idx
    ukm, inv_mu = s0.dense_levels(kmu, C * 2)
    eta_mu = s0.neumaier_rows([np.full(ukm.size, bm[0]), bm[1 + ukm // 2], bm[1 + C + ukm % 2]])
    mu = s0._map_scalar(s0._safe_exp, eta_mu)[inv_mu]
    # phi: one value per (mcc, channel, ln g) level
    ul, inv_l = np.unique(ln_g, return_inverse=True)
    kphi = kmu * max(ul.size, 1) + inv_l.reshape(-1)
    ukp, inv_phi = np.unique(kphi, return_inverse=True)
    lvl = ukp // max(ul.size, 1)
    lng_u = ul[ukp % max(ul.size, 1)] if ul.size else np.zeros(0)
    eta_phi = s0.neumaier_rows([np.full(ukp.size, bp[0]), bp[1 + lvl // 2], bp[1 + C + lvl % 2],
                                bp[1 + C + 2] * lng_u])
    phi = s0._map_scalar(s0._safe_exp, eta_phi)[inv_phi]
    bad = ~(np.isfinite(mu) & (mu > 0) & np.isfinite(phi) & (phi > 0))
    if bad.any():
        idx = np.flatnonzero(bad)
        raise ModelError("ERR_S2_NUMERIC_INVALID", f"NB mean mu or dispersion phi is not finite and > 0 for "
                         f"{idx.size} merchant(s) (decision 8)", path=dc.path,
                         rows=[f"{s0._mid_rows([i], merchant_id)[0]} mu={mu[i]!r} phi={phi[i]!r}" for i in idx[:10]])
    return mu, phi


# ============================================================================================
# sampling
# ============================================================================================


def nb_sample(M: bytes, merchant_id: np.ndarray, mu: np.ndarray, phi: np.ndarray, *,
              max_attempts: int = MAX_NB_ATTEMPTS) -> dict:
    """Draw N for every merchant (rows in ascending ``merchant_id``).

    Returns ``{"n_outlets", "nb_rejections", "gamma", "poisson", "final"}``; the last three are event-column
    dicts (rows ordered by merchant, then attempt) ready for ``RngLogs.add_events``.
    """
    from engine.core import rng, samplers

    mid = np.asarray(merchant_id, dtype=np.uint64)
    mu = np.asarray(mu, dtype=np.float64)
    phi = np.asarray(phi, dtype=np.float64)
    n = mid.size
    s1._require_ascending(mid)
    mu64 = rng.merchant_u64_vec(mid)
    kg, hg, lg = rng.substreams_vec(M, "1A", GAMMA_LABEL, mu64)
    kp, hp, lp = rng.substreams_vec(M, "1A", POISSON_LABEL, mu64)
    kf, hf, lf = rng.substreams_vec(M, "1A", FINAL_LABEL, mu64)
    hg, lg, hp, lp = hg.copy(), lg.copy(), hp.copy(), lp.copy()
    ratio = mu / phi  # 2.4 step 2: mu/phi first, then times G

    N = np.zeros(n, dtype=np.int64)
    R = np.zeros(n, dtype=np.int64)
    g_parts: list[tuple] = []
    p_parts: list[tuple] = []
    active = np.arange(n, dtype=np.int64)
    t = 0
    while active.size:
        if t >= max_attempts:
            raise ModelError("ERR_S2_ATTEMPT_CAP",
                             f"{active.size} merchant(s) drew N in {{0, 1}} {max_attempts} times in a row "
                             "(decision 8 cap; the NB model gives them almost no mass at N >= 2)",
                             rows=[f"merchant_id={int(mid[i])} mu={mu[i]!r} phi={phi[i]!r}" for i in active[:10]],
                             detail={"max_attempts": max_attempts})
        G, ga_hi, ga_lo, g_bl, g_dr = samplers.gamma_vec(kg[active], hg[active], lg[active], phi[active])
        lam = ratio[active] * G
        bad = ~(np.isfinite(lam) & (lam > 0.0) & (lam <= samplers.POISSON_LAMBDA_MAX))
        if bad.any():
            i = active[np.flatnonzero(bad)]
            raise ModelError("ERR_S2_NUMERIC_INVALID", f"Poisson rate lambda = (mu/phi)*G is not finite, > 0 and within "
                             f"the sampler's range for {i.size} merchant(s)",
                             rows=[f"merchant_id={int(mid[j])} mu={mu[j]!r} phi={phi[j]!r}" for j in i[:10]])
        K, pa_hi, pa_lo, p_bl, p_dr = samplers.poisson_vec(kp[active], hp[active], lp[active], lam)
        g_parts.append((active, hg[active], lg[active], ga_hi, ga_lo, g_bl, g_dr, G))
        p_parts.append((active, hp[active], lp[active], pa_hi, pa_lo, p_bl, p_dr, lam, K, t + 1))
        hg[active], lg[active] = ga_hi, ga_lo
        hp[active], lp[active] = pa_hi, pa_lo
        acc = K >= 2
        N[active[acc]] = K[acc]
        R[active[acc]] = t
        active = active[~acc]
        t += 1

    over = N > SITE_LIMIT
    if over.any():
        idx = np.flatnonzero(over)
        raise ModelError("ERR_S2_FINAL_INVALID_N", f"{idx.size} merchant(s) drew more outlets than the catalogue's "
                         f"6-digit site_order allows ({SITE_LIMIT}) (decision 8)",
                         rows=[f"merchant_id={int(mid[i])} n_outlets={int(N[i])} mu={mu[i]!r}" for i in idx[:10]])

    def _cat(parts, j, dtype=None):
        a = np.concatenate([p[j] for p in parts]) if parts else np.zeros(0)
        return a.astype(dtype) if dtype is not None else a

    g_row = _cat(g_parts, 0, np.int64)
    go = np.argsort(g_row, kind="stable")  # rounds are in attempt order: stable sort -> (merchant, attempt)
    gamma = {
        "merchant_id": mid[g_row[go]],
        "before_hi": _cat(g_parts, 1, np.uint64)[go], "before_lo": _cat(g_parts, 2, np.uint64)[go],
        "after_hi": _cat(g_parts, 3, np.uint64)[go], "after_lo": _cat(g_parts, 4, np.uint64)[go],
        "blocks": _cat(g_parts, 5, np.uint64)[go], "draws": _cat(g_parts, 6, np.uint64)[go],
        "context": np.full(go.size, "nb", dtype=object),
        "index": np.zeros(go.size, dtype=np.int64),
        "alpha": phi[g_row[go]],
        "gamma_value": _cat(g_parts, 7, np.float64)[go],
    }
    p_row = _cat(p_parts, 0, np.int64)
    po = np.argsort(p_row, kind="stable")
    att = np.concatenate([np.full(p[0].size, p[9], dtype=np.int64) for p in p_parts]) if p_parts else np.zeros(0, np.int64)
    poisson = {
        "merchant_id": mid[p_row[po]],
        "before_hi": _cat(p_parts, 1, np.uint64)[po], "before_lo": _cat(p_parts, 2, np.uint64)[po],
        "after_hi": _cat(p_parts, 3, np.uint64)[po], "after_lo": _cat(p_parts, 4, np.uint64)[po],
        "blocks": _cat(p_parts, 5, np.uint64)[po], "draws": _cat(p_parts, 6, np.uint64)[po],
        "context": np.full(po.size, "nb", dtype=object),
        "lambda": _cat(p_parts, 7, np.float64)[po],
        "k": _cat(p_parts, 8, np.int64)[po],
        "attempt": att[po],
    }
    zero = np.zeros(n, dtype=np.uint64)
    final = {
        "merchant_id": mid,
        "before_hi": hf, "before_lo": lf, "after_hi": hf.copy(), "after_lo": lf.copy(),
        "blocks": zero, "draws": zero.copy(),
        "mu": mu, "dispersion_k": phi, "n_outlets": N, "nb_rejections": R,
    }
    return {"n_outlets": N, "nb_rejections": R, "gamma": gamma, "poisson": poisson, "final": final}


# ============================================================================================
# run-level corridors (2.6) — pure; S9 calls it
# ============================================================================================


def nb_acceptance(mu, phi) -> np.ndarray:
    """alpha = P(N >= 2) per merchant, evaluated in the 2.6 order with scalar libm on distinct (mu, phi)."""
    mu = np.asarray(mu, dtype=np.float64)
    phi = np.asarray(phi, dtype=np.float64)
    if mu.size == 0:
        return np.zeros(0)
    pairs = np.stack([mu.view(np.uint64), phi.view(np.uint64)], axis=1)
    up, inv = np.unique(pairs, axis=0, return_inverse=True)
    umu = up[:, 0].copy().view(np.float64)
    uphi = up[:, 1].copy().view(np.float64)

    def one(m: float, f: float) -> float:
        try:
            p = f / (m + f)
            P0 = math.exp(f * math.log(p))
            P1 = P0 * f * (1.0 - p)
            return 1.0 - P0 - P1
        except (ValueError, OverflowError, ZeroDivisionError):
            return math.nan

    a = np.fromiter((one(m, f) for m, f in zip(umu.tolist(), uphi.tolist())), dtype=np.float64, count=umu.size)
    return a[inv.reshape(-1)]


def _corridor_policy(policy: dict) -> dict:
    """Flat ``{rho_reject_max, p99_max, cusum_k, cusum_h, alpha_cap}`` from either the flat form of
    :func:`engine.segment1a.inputs.load_s2_validation_policy` or the nested S9 form
    ``{rho_reject_max, p99_max, cusum: {reference_k, threshold_h, alpha_cap?}}``."""
    if "cusum" in policy and isinstance(policy["cusum"], dict):
        c = policy["cusum"]
        if "reference_k" not in c or "threshold_h" not in c:
            raise InputError("ERR_S2_CORRIDOR_POLICY_MISSING", "cusum.reference_k and cusum.threshold_h are required")
        return {"rho_reject_max": float(policy.get("rho_reject_max", inp.S2_SPEC_RHO_MAX)),
                "p99_max": policy.get("p99_max", inp.S2_SPEC_P99_MAX),
                "cusum_k": float(c["reference_k"]), "cusum_h": float(c["threshold_h"]),
                "alpha_cap": float(c.get("alpha_cap", 1.0))}
    for k in ("cusum_k", "cusum_h"):
        if k not in policy:
            raise InputError("ERR_S2_CORRIDOR_POLICY_MISSING", f"corridor policy lacks {k}")
    return {"rho_reject_max": float(policy.get("rho_reject_max", inp.S2_SPEC_RHO_MAX)),
            "p99_max": policy.get("p99_max", inp.S2_SPEC_P99_MAX),
            "cusum_k": float(policy["cusum_k"]), "cusum_h": float(policy["cusum_h"]),
            "alpha_cap": float(policy.get("alpha_cap", 1.0))}


def corridor_metrics(mu, phi, nb_rejections, policy: dict, merchant_id=None) -> dict:
    """Run-level S2 corridors (1A-S1-S4 2.6) over the merchants with one ``nb_final`` each.

    Rows are taken in ascending ``merchant_id`` when it is given (so shuffled rows give identical metrics),
    else in the given order (the caller sorted them). ``policy``: flat
    (:func:`engine.segment1a.inputs.load_s2_validation_policy`) or nested (``cusum: {reference_k,
    threshold_h, alpha_cap?}``). Returns ``{rho_hat, p99, s_max (= Smax), M, R, A, breaches, alpha_invalid,
    policy}`` where ``breaches`` lists ``rho`` / ``p99`` / ``cusum`` (reported as ``corridor_breach:<name>``)
    and ``alpha_invalid`` the row indices (input order) excluded with ``ERR_S2_CORRIDOR_ALPHA_INVALID``;
    ``M == 0`` is ``ERR_S2_CORRIDOR_EMPTY`` for the caller.

    Evaluation (2.6): ``p = phi/(mu+phi)``, ``P0 = exp(phi ln p)``, ``P1 = P0 phi (1-p)``, ``alpha = 1-P0-P1``
    (scalar libm on distinct (mu, phi)); ``rho = R/A``; nearest-rank p99 with rank ``ceil(0.99 M)`` computed
    in integers; CUSUM ``S = max(0, S + z - k)`` serially, ``z := 0`` where ``alpha~ = 1``.
    """
    pol = _corridor_policy(policy)
    mu = np.asarray(mu, dtype=np.float64)
    phi = np.asarray(phi, dtype=np.float64)
    r = np.asarray(nb_rejections, dtype=np.int64)
    if merchant_id is not None:
        order = np.argsort(np.asarray(merchant_id, dtype=np.uint64), kind="stable")
    else:
        order = np.arange(mu.size)
    mu, phi, r = mu[order], phi[order], r[order]
    alpha = nb_acceptance(mu, phi)
    valid = np.isfinite(alpha) & (alpha > 0.0) & (alpha <= 1.0)
    invalid_rows = sorted(int(i) for i in order[~valid])
    r_v, a_v = r[valid], alpha[valid]
    M = int(r_v.size)
    out = {"M": M, "alpha_invalid": invalid_rows, "breaches": [], "policy": pol}
    if M == 0:
        out.update({"rho_hat": None, "p99": None, "s_max": None, "Smax": None, "R": 0, "A": 0})
        return out
    R = int(r_v.sum())
    A = int((r_v + 1).sum())
    rho = R / A
    rank = (99 * M + 99) // 100  # ceil(0.99 * M) in exact integer arithmetic (nearest rank, 1-based)
    p99 = int(np.sort(r_v, kind="stable")[rank - 1])
    at = np.minimum(a_v, pol["alpha_cap"])
    E = (1.0 - at) / at
    V = (1.0 - at) / (at * at)
    safe_v = np.where(V > 0.0, V, 1.0)
    z = np.where(V > 0.0, (r_v - E) / np.sqrt(safe_v), 0.0)  # alpha~ = 1 -> V = 0 -> z := 0 (2.6 decision)
    k = pol["cusum_k"]
    S = 0.0
    Smax = 0.0
    for zi in z.tolist():  # serial, ascending merchant_id (2.6)
        S = max(0.0, S + zi - k)
        if S > Smax:
            Smax = S
    if rho > pol["rho_reject_max"]:
        out["breaches"].append("rho")
    if p99 > pol["p99_max"]:
        out["breaches"].append("p99")
    if not Smax < pol["cusum_h"]:
        out["breaches"].append("cusum")
    out.update({"rho_hat": rho, "p99": p99, "s_max": Smax, "Smax": Smax, "R": R, "A": A})
    return out


# ============================================================================================
# run
# ============================================================================================


def multi_site_merchants(hurdle_events, merchant_ids: np.ndarray, path=None) -> np.ndarray:
    """Boolean mask over ``merchant_ids`` (ascending) of ``is_multi`` from the hurdle events; every merchant must
    have exactly one hurdle event (``ERR_S2_ENTRY_MISSING_HURDLE`` otherwise)."""
    ev_id = np.asarray(hurdle_events.column("merchant_id").to_numpy(), dtype=np.uint64)
    ev_multi = np.asarray(hurdle_events.column("is_multi").to_numpy(zero_copy_only=False), dtype=bool)
    o = np.argsort(ev_id, kind="stable")
    ev_id, ev_multi = ev_id[o], ev_multi[o]
    dup = ev_id[1:][ev_id[1:] == ev_id[:-1]]
    if dup.size:
        raise InputError("ERR_S2_ENTRY_MISSING_HURDLE", "merchants with more than one hurdle event", path=path,
                         rows=[f"merchant_id={int(m)}" for m in dup[:10]])
    pos = np.searchsorted(ev_id, merchant_ids)
    pos_c = np.minimum(pos, max(ev_id.size - 1, 0))
    found = (pos < ev_id.size) & (ev_id[pos_c] == merchant_ids) if ev_id.size else np.zeros(merchant_ids.size, bool)
    if not found.all():
        miss = merchant_ids[~found]
        raise InputError("ERR_S2_ENTRY_MISSING_HURDLE", f"{miss.size} merchant(s) of the design matrix have no hurdle "
                         "event (run S1 first)", path=path, rows=[f"merchant_id={int(m)}" for m in miss[:10]])
    if ev_id.size != merchant_ids.size:
        extra = np.setdiff1d(ev_id, merchant_ids)
        raise InputError("ERR_S2_ENTRY_MISSING_HURDLE", "hurdle events for merchants outside the design matrix",
                         path=path, rows=[f"merchant_id={int(m)}" for m in extra[:10]])
    return ev_multi[pos_c]


def run(ctx) -> None:
    from engine.core import rng, rnglog
    from engine.core.rnglog import RngLogs

    par = ctx.config["segment1a"]["parameters"]
    hc = inp.load_hurdle_coefficients(par["hurdle_coefficients.yaml"])
    dc = inp.load_dispersion_coefficients(par["nb_dispersion_coefficients.yaml"])
    inp.check_coefficients_aligned(hc, dc)
    dm = inp.read_design_matrix(ctx)
    mid_all = np.asarray(dm.column("merchant_id").to_numpy(), dtype=np.uint64)
    ev = rnglog.read_events(ctx.data_root, ctx.ids, "hurdle_bernoulli", columns=["merchant_id", "is_multi"],
                            config=ctx.config)
    multi = multi_site_merchants(ev, mid_all, path=ctx.path("rng_event", family="hurdle_bernoulli"))
    sel = np.flatnonzero(multi)
    mid = mid_all[sel]
    mcc_idx, ch_idx = s0.category_index(np.asarray(dm.column("mcc").to_numpy())[sel],
                                        dm.column("channel").combine_chunks().take(sel), hc.dict_mcc,
                                        merchant_id=mid, path=hc.path)
    ln_g = np.asarray(dm.column("log_gdp_pc_usd_2015").to_numpy(), dtype=np.float64)[sel]
    mu, phi = nb_links(hc, dc, mcc_idx, ch_idx, ln_g, merchant_id=mid)
    M = rng.master_material("1A", ctx.ids.fingerprint_bytes, ctx.ids.seed)
    res = nb_sample(M, mid, mu, phi)
    logs = RngLogs(ctx.data_root, "1A", ctx.ids, ctx.config)
    logs.add_events(GAMMA_FAMILY, GAMMA_MODULE, GAMMA_LABEL, res["gamma"])
    logs.add_events(POISSON_FAMILY, POISSON_MODULE, POISSON_LABEL, res["poisson"], part=POISSON_PART)
    logs.add_events(FINAL_FAMILY, FINAL_MODULE, FINAL_LABEL, res["final"])
    logs.close()

