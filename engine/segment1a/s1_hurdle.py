"""1A S1 — hurdle: one logistic Bernoulli per merchant, single- vs multi-site (1A-S1-S4 section 1).

``run(ctx)`` reads S0's ``hurdle_design_matrix`` (the run's merchant universe) and the hurdle coefficients,
recomputes eta and pi exactly as S0 does (``hurdle_pi_probs`` is diagnostic only and never read, 1.5),
draws on substream ``hurdle_bernoulli`` (module ``1A.hurdle_sampler``) and logs one ``hurdle_bernoulli``
event per merchant plus the trace. S1 writes no dataset.

Budget (1.3): pi exactly 0.0 or 1.0 -> no draw (``deterministic=true``, ``u=null``, blocks 0, draws "0",
after == before, ``is_multi = (pi == 1.0)``); otherwise one uniform from the low lane of the merchant's base
counter, ``is_multi = (u < pi)``, blocks 1, draws "1". Non-finite eta / pi are run errors
``hurdle_nonfinite_eta`` / ``hurdle_nonfinite_or_oob_pi`` (decision 8). The optional diagnostic ``eta`` is
not written (1.4: SHOULD NOT).
"""

from __future__ import annotations

import numpy as np

from engine.core.errors import InputError
from engine.segment1a import inputs as inp
from engine.segment1a import s0_foundations as s0

FAMILY = "hurdle_bernoulli"
MODULE = "1A.hurdle_sampler"
LABEL = "hurdle_bernoulli"
ETA_CODE = "hurdle_nonfinite_eta"
PI_CODE = "hurdle_nonfinite_or_oob_pi"


def hurdle_pi(hc: inp.HurdleCoefficients, mcc, channel, bucket, merchant_id=None) -> tuple[np.ndarray, np.ndarray]:
    """``(eta, pi)`` from the design columns (same function as S0; S1's failure codes)."""
    mcc_idx, ch_idx = s0.category_index(np.asarray(mcc), channel, hc.dict_mcc, merchant_id=merchant_id, path=hc.path)
    return s0.hurdle_eta_pi(hc, mcc_idx, ch_idx, np.asarray(bucket), merchant_id=merchant_id,
                            eta_code=ETA_CODE, pi_code=PI_CODE)


def hurdle_draws(M: bytes, merchant_id: np.ndarray, pi: np.ndarray) -> dict:
    """Vectorised hurdle Bernoulli over all merchants (ascending ``merchant_id``).

    Returns the event columns: ``merchant_id, before_hi, before_lo, after_hi, after_lo, blocks, draws, pi,
    u (NaN = null), is_multi, deterministic``.
    """
    from engine.core import rng, samplers

    mid = np.asarray(merchant_id, dtype=np.uint64)
    _require_ascending(mid)
    mu64 = rng.merchant_u64_vec(mid)
    key, hi, lo = rng.substreams_vec(M, "1A", LABEL, mu64)
    r = samplers.bernoulli_vec(key, hi, lo, np.asarray(pi, dtype=np.float64))
    return {
        "merchant_id": mid,
        "before_hi": hi,
        "before_lo": lo,
        "after_hi": r["hi_after"],
        "after_lo": r["lo_after"],
        "blocks": r["blocks"],
        "draws": r["draws"],
        "pi": np.asarray(pi, dtype=np.float64),
        "u": r["u"],
        "is_multi": r["is_multi"],
        "deterministic": r["deterministic"],
    }


def _require_ascending(mid: np.ndarray) -> None:
    """Event rows are written in ascending merchant_id (writer order); callers pass sorted, unique ids."""
    if mid.size > 1 and not bool(np.all(mid[1:] > mid[:-1])):
        raise ValueError("merchant ids must be strictly ascending (unique, sorted)")


def run(ctx) -> None:
    from engine.core import rng
    from engine.core.rnglog import RngLogs

    hc = inp.load_hurdle_coefficients(ctx.config["segment1a"]["parameters"]["hurdle_coefficients.yaml"])
    dm = inp.read_design_matrix(ctx)
    if dm.num_rows == 0:
        raise InputError("E_UPSTREAM_MISSING", "hurdle_design_matrix has no rows", path=ctx.path("hurdle_design_matrix"))
    mid = np.asarray(dm.column("merchant_id").to_numpy(), dtype=np.uint64)
    _eta, pi = hurdle_pi(hc, dm.column("mcc").to_numpy(), dm.column("channel").combine_chunks(),
                         dm.column("gdp_bucket_id").to_numpy(), merchant_id=mid)
    M = rng.master_material("1A", ctx.ids.fingerprint_bytes, ctx.ids.seed)
    cols = hurdle_draws(M, mid, pi)
    logs = RngLogs(ctx.data_root, "1A", ctx.ids, ctx.config)
    logs.add_events(FAMILY, MODULE, LABEL, cols)
    logs.close()
