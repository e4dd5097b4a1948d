"""1A S5 — currency -> country weights (RNG-free) and merchant settlement currency (S5.0).

Spec: ``1A-S5-S9.md`` §2 (with ⚑3 coverage widening by override keys, ⚑4 signed remainder,
⚑5 degrade rules) and README decisions 13 (scoping) and 28 (every merchant's currency has weights).

Outputs
* ``ccy_country_weights_cache`` (``parameter_hash=`` only: its bytes depend on parameter files only)
  holding ``part-00000.parquet`` and the S5 receipt ``S5_VALIDATION.json`` + ``_passed.flag``;
* ``sparse_flag`` (``parameter_hash=``);
* ``merchant_currency`` (``parameter_hash=/fingerprint=``: depends on the merchant table).

Public helpers used by S6/S7 (and S9):
``load_strict_yaml``, ``neumaier``, ``flag_text``, ``write_receipt_flag``-style ``receipt_flag_bytes``,
``verify_receipt``, ``read_weights`` (gate + read of the cache), ``read_merchant_currency``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from engine.core.numeric import neumaier_sum
from engine.core.errors import GateError, InputError, ModelError
from engine.core.hashing import file_sha256_hex

MODULE = "1A.expand_currency_to_country"
PRODUCER_MCURR = "1A.derive_merchant_currency"
RECEIPT_NAME = "S5_VALIDATION.json"
FLAG_NAME = "_passed.flag"
SHARE_COLUMNS = ("currency", "country_iso", "share", "obs_count")
SUM_TOL = 1e-6  # §2.1 pre-flight: per currency Σ share = 1 ± 1e-6
_CCY_RE = re.compile(r"^[A-Z]{3}$")
_ISO_RE = re.compile(r"^[A-Z]{2}$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_POLICY_KEYS = ("blend_weight", "alpha", "obs_floor", "min_share", "shrink_exponent")

SCHEMA_DIR_PARTS = ("contracts", "schemas", "1A")


# --------------------------------------------------------------------------------------------
# small shared helpers (also used by S6/S7)
# --------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (§2.1: loaders MUST reject duplicate keys)."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_strict_yaml(path: str | Path, code: str) -> Any:
    """Parse a policy YAML, failing with ``code`` on syntax errors or duplicate keys."""
    try:
        with open(path, "rb") as f:
            return yaml.load(f, Loader=_StrictLoader)  # noqa: S506 - strict SafeLoader subclass
    except (OSError, yaml.YAMLError) as e:
        raise InputError(code, f"cannot parse policy file: {e}", path=path) from e


neumaier = neumaier_sum  # fixed-order Neumaier sum (numeric policy)

def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def flag_text(digest_hex: str) -> bytes:
    """``_passed.flag`` body (00-core 5.2 line format; trailing newline as HEAD writes it)."""
    return f"sha256_hex = {digest_hex}\n".encode("ascii")


def receipt_digest(folder: Path, members: list[str]) -> str:
    """SHA-256 over the members' raw bytes concatenated in ASCII name order (⚑12)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(members):
        h.update((Path(folder) / name).read_bytes())
    return h.hexdigest()


def verify_receipt(folder: Path, members: list[str], what: str) -> str:
    """Recompute a state receipt's flag ("No PASS -> no read"); returns the digest.

    ``members`` are the receipt files the flag covers. Raises ``GateError`` ``E_PASS_GATE_MISSING``
    when the flag or a member is missing and ``E_FLAG_HASH_MISMATCH`` when it does not match.
    """
    folder = Path(folder)
    flag = folder / FLAG_NAME
    missing = [m for m in [FLAG_NAME, *members] if not (folder / m).is_file()]
    if missing:
        raise GateError(
            "E_PASS_GATE_MISSING",
            f"No PASS -> no read: {what} receipt incomplete at {folder}",
            path=folder,
            rows=missing,
        )
    text = flag.read_text(encoding="ascii").strip()
    m = re.fullmatch(r"sha256_hex = ([0-9a-f]{64})", text)
    if not m:
        raise GateError("E_FLAG_FORMAT_INVALID", f"No PASS -> no read: {what} flag malformed", path=flag)
    digest = receipt_digest(folder, members)
    if digest != m.group(1):
        raise GateError(
            "E_FLAG_HASH_MISMATCH",
            f"No PASS -> no read: {what} flag does not match its receipt",
            path=flag,
            detail={"flag": m.group(1), "recomputed": digest},
        )
    return digest


def schema_path(ctx_or_repo, dataset_id: str) -> Path:
    repo = getattr(ctx_or_repo, "repo_root", ctx_or_repo)
    return Path(repo).joinpath(*SCHEMA_DIR_PARTS, f"{dataset_id}.schema.json")


def canonical_json_bytes(obj: Any) -> bytes:
    """Canonical JSON bytes (``engine.core.publish``: sorted keys, compact, ASCII, floats via repr)."""
    from engine.core import publish

    return publish.canonical_json_bytes(obj)


def write_json_file(obj: Any, path: Path) -> None:
    from engine.core import publish

    publish.write_json(obj, path)


def nearest_rank(sorted_vals: list[int], p: float) -> int:
    if not sorted_vals:
        return 0
    r = max(1, math.ceil(p / 100.0 * len(sorted_vals)))
    return int(sorted_vals[r - 1])


def iso_sort_key_desc(s: str) -> tuple:
    return tuple(-ord(ch) for ch in s)


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


@dataclass
class ShareSurface:
    name: str
    path: str
    currency: list[str]
    country_iso: list[str]
    share: list[float]
    obs_count: list[int]

    def by_currency(self) -> dict[str, dict[str, tuple[float, int]]]:
        out: dict[str, dict[str, tuple[float, int]]] = {}
        for c, i, s, n in zip(self.currency, self.country_iso, self.share, self.obs_count):
            out.setdefault(c, {})[i] = (s, n)
        return out


def parse_share_surface(name: str, path: str, header: list[str], rows: list[list[str]], iso_set: set[str]) -> ShareSurface:
    """Validate a share surface (§2.1 pre-flight; fail closed, no repair).

    ``rows`` are the raw CSV cells (strings); row numbers in errors are CSV line numbers.
    """
    if sorted(header) != sorted(SHARE_COLUMNS) or len(header) != len(SHARE_COLUMNS):
        raise InputError(
            "E_INPUT_SCHEMA",
            f"{name}: columns must be exactly {list(SHARE_COLUMNS)}",
            path=path,
            rows=[f"header: {header}"],
        )
    idx = {h: header.index(h) for h in SHARE_COLUMNS}
    bad: list[str] = []
    cur, iso, share, obs = [], [], [], []
    seen: dict[tuple[str, str], int] = {}
    for k, r in enumerate(rows):
        line = k + 2
        if len(r) != len(header):
            bad.append(f"line {line}: {len(r)} cells, expected {len(header)}")
            continue
        c, i, s, n = (r[idx[h]] for h in SHARE_COLUMNS)
        problems = []
        if not _CCY_RE.match(c):
            problems.append(f"currency {c!r} is not an upper-case ISO 4217 code")
        if not _ISO_RE.match(i):
            problems.append(f"country_iso {i!r} is not an upper-case ISO2 code")
        elif i not in iso_set:
            problems.append(f"country_iso {i!r} not in the ISO table")
        try:
            sv = float(s)
            if not (math.isfinite(sv) and 0.0 <= sv <= 1.0):
                problems.append(f"share {s!r} not finite in [0,1]")
        except ValueError:
            sv = float("nan")
            problems.append(f"share {s!r} is not a number")
        if re.fullmatch(r"[0-9]+", n.strip() if n else ""):
            nv = int(n)
        else:
            nv = -1
            problems.append(f"obs_count {n!r} is not an integer >= 0")
        key = (c, i)
        if key in seen:
            problems.append(f"duplicate (currency, country_iso) {key} (first at line {seen[key]})")
        else:
            seen[key] = line
        if problems:
            bad.append(f"line {line}: " + "; ".join(problems))
            continue
        cur.append(c)
        iso.append(i)
        share.append(sv)
        obs.append(nv)
    if bad:
        raise InputError("E_INPUT_SCHEMA", f"{name}: invalid rows", path=path, rows=bad)
    surf = ShareSurface(name, path, cur, iso, share, obs)
    sums = []
    for c, m in sorted(surf.by_currency().items()):
        tot = neumaier(v[0] for _, v in sorted(m.items()))
        if abs(tot - 1.0) > SUM_TOL:
            sums.append(f"{c}: sum(share) = {tot!r}")
    if sums:
        raise InputError("E_INPUT_SUM", f"{name}: per-currency shares must sum to 1 ± {SUM_TOL}", path=path, rows=sums)
    return surf


def load_share_surface(name: str, path: str | Path, iso_set: set[str]) -> ShareSurface:
    """Read a share CSV as strings (decision 12: ``NA`` is Namibia, never a null) and validate it."""
    import csv

    path = str(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rd = csv.reader(f)
            try:
                header = next(rd)
            except StopIteration:
                raise InputError("E_INPUT_SCHEMA", f"{name}: empty file", path=path) from None
            rows = [r for r in rd if r]
    except OSError as e:
        raise InputError("E_INPUT_SCHEMA", f"{name}: cannot read: {e}", path=path) from e
    header = [h.strip().lstrip("\ufeff") for h in header]
    return parse_share_surface(name, path, header, rows, iso_set)


@dataclass
class SmoothingPolicy:
    path: str
    semver: str
    version: str
    dp: int
    defaults: dict[str, Any]
    per_currency: dict[str, dict[str, Any]] = field(default_factory=dict)
    alpha_iso: dict[str, dict[str, float]] = field(default_factory=dict)
    min_share_iso: dict[str, dict[str, float]] = field(default_factory=dict)

    def resolve(self, ccy: str, key: str) -> Any:
        pc = self.per_currency.get(ccy, {})
        return pc[key] if key in pc else self.defaults[key]

    def alpha(self, ccy: str, iso: str) -> float:
        o = self.alpha_iso.get(ccy, {})
        return float(o[iso]) if iso in o else float(self.resolve(ccy, "alpha"))

    def min_share(self, ccy: str, iso: str) -> float:
        o = self.min_share_iso.get(ccy, {})
        return float(o[iso]) if iso in o else float(self.resolve(ccy, "min_share"))


def _check_param(key: str, v: Any) -> str | None:
    if key in ("blend_weight", "min_share"):
        ok = is_number(v) and 0.0 <= float(v) <= 1.0
        return None if ok else f"{key} must be a number in [0,1], got {v!r}"
    if key in ("alpha", "shrink_exponent"):
        return None if (is_number(v) and float(v) >= 0.0) else f"{key} must be a number >= 0, got {v!r}"
    if key == "obs_floor":
        return None if (is_int(v) and v >= 0) else f"obs_floor must be an integer >= 0, got {v!r}"
    return f"unknown key {key!r}"


def parse_smoothing_policy(doc: Any, path: str, iso_set: set[str], currencies: set[str] | None) -> SmoothingPolicy:
    """Validate ``ccy_smoothing_params.yaml`` (§2.1 schematic; additionalProperties false everywhere).

    ``currencies`` (the union of the two surfaces) makes a currency named only by the policy an
    ``E_POLICY_UNKNOWN_CODE`` (⚑5: we take the spec's side — decision 28: a rule that can never match
    is an error, not a silent no-op).
    """
    errs: list[str] = []
    code = "E_POLICY_DOMAIN"
    if not isinstance(doc, dict):
        raise InputError(code, "policy must be a mapping", path=path)
    allowed = {"semver", "version", "dp", "defaults", "per_currency", "overrides"}
    for k in doc:
        if k not in allowed:
            errs.append(f"unknown top-level key {k!r}")
    for k in ("semver", "version", "dp", "defaults"):
        if k not in doc:
            errs.append(f"missing required key {k!r}")
    if "semver" in doc and not isinstance(doc["semver"], str):
        errs.append("semver must be a string")
    if "version" in doc and not (isinstance(doc["version"], str) and _DATE_RE.match(doc["version"])):
        errs.append("version must be a YYYY-MM-DD string")
    dp = doc.get("dp")
    if "dp" in doc and not (is_int(dp) and 0 <= dp <= 18):
        errs.append(f"dp must be an integer in 0..18, got {dp!r}")
    defaults = doc.get("defaults")
    if "defaults" in doc:
        if not isinstance(defaults, dict):
            errs.append("defaults must be a mapping")
        else:
            for k in _POLICY_KEYS:
                if k not in defaults:
                    errs.append(f"defaults: missing {k!r}")
            for k, v in defaults.items():
                e = _check_param(k, v)
                if e:
                    errs.append(f"defaults: {e}")
    per_currency = doc.get("per_currency") or {}
    if not isinstance(per_currency, dict):
        errs.append("per_currency must be a mapping")
        per_currency = {}
    unknown_codes: list[str] = []
    for ccy, block in per_currency.items():
        if not (isinstance(ccy, str) and _CCY_RE.match(ccy)):
            errs.append(f"per_currency: {ccy!r} is not an ISO 4217 code")
            continue
        if currencies is not None and ccy not in currencies:
            unknown_codes.append(f"per_currency.{ccy}: currency not in either share surface")
        if not isinstance(block, dict):
            errs.append(f"per_currency.{ccy} must be a mapping")
            continue
        for k, v in block.items():
            e = _check_param(k, v)
            if e:
                errs.append(f"per_currency.{ccy}: {e}")
    overrides = doc.get("overrides") or {}
    alpha_iso: dict[str, dict[str, float]] = {}
    min_share_iso: dict[str, dict[str, float]] = {}
    if not isinstance(overrides, dict):
        errs.append("overrides must be a mapping")
        overrides = {}
    for k in overrides:
        if k not in ("alpha_iso", "min_share_iso"):
            errs.append(f"overrides: unknown key {k!r} (only alpha_iso, min_share_iso)")
    for okey, target, pkey in (("alpha_iso", alpha_iso, "alpha"), ("min_share_iso", min_share_iso, "min_share")):
        block = overrides.get(okey) or {}
        if not isinstance(block, dict):
            errs.append(f"overrides.{okey} must be a mapping")
            continue
        for ccy, m in block.items():
            if not (isinstance(ccy, str) and _CCY_RE.match(ccy)):
                errs.append(f"overrides.{okey}: {ccy!r} is not an ISO 4217 code")
                continue
            if currencies is not None and ccy not in currencies:
                unknown_codes.append(f"overrides.{okey}.{ccy}: currency not in either share surface")
            if not isinstance(m, dict):
                errs.append(f"overrides.{okey}.{ccy} must be a mapping")
                continue
            target[ccy] = {}
            for iso, v in m.items():
                if not (isinstance(iso, str) and _ISO_RE.match(iso) and iso in iso_set):
                    unknown_codes.append(f"overrides.{okey}.{ccy}.{iso}: not an ISO2 code of the ISO table")
                    continue
                e = _check_param(pkey, v)
                if e:
                    errs.append(f"overrides.{okey}.{ccy}.{iso}: {e}")
                    continue
                target[ccy][iso] = float(v)
    if errs:
        raise InputError(code, "ccy_smoothing_params: out-of-domain or unknown keys", path=path, rows=errs)
    if unknown_codes:
        raise InputError("E_POLICY_UNKNOWN_CODE", "ccy_smoothing_params names unknown codes", path=path, rows=unknown_codes)
    infeasible = []
    for ccy, m in sorted(min_share_iso.items()):
        tot = neumaier(v for _, v in sorted(m.items()))
        if tot > 1.0:
            infeasible.append(f"{ccy}: sum(min_share_iso) = {tot!r} > 1")
    if infeasible:
        raise InputError(
            "E_POLICY_MINSHARE_FEASIBILITY", "min_share_iso floors exceed 1 for a currency", path=path, rows=infeasible
        )
    return SmoothingPolicy(
        path=path,
        semver=doc["semver"],
        version=doc["version"],
        dp=int(dp),
        defaults=dict(defaults),
        per_currency={k: dict(v) for k, v in per_currency.items()},
        alpha_iso=alpha_iso,
        min_share_iso=min_share_iso,
    )


# --------------------------------------------------------------------------------------------
# compute (pure)
# --------------------------------------------------------------------------------------------


def quantise_largest_remainder(p: list[float], isos: list[str], dp: int) -> tuple[list[int], int]:
    """§2.3 step 9: round-half-even ticks, then fix Σ to 10^dp by the *signed* remainder (⚑4).

    δ > 0: +1 tick to the δ countries first by (r descending, ISO A→Z);
    δ < 0: −1 tick from the |δ| countries first by (r ascending, ISO Z→A).
    Returns (ticks, |δ|).
    """
    S = 10**dp
    ticks: list[int] = []
    rem: list[float] = []
    for pi in p:
        x = float(pi) * S
        t = round(x)  # Python round(): exact round-half-even of the binary64 value
        ticks.append(int(t))
        rem.append(x - t)
    delta = S - sum(ticks)
    n = len(p)
    if abs(delta) > n:
        raise ModelError("E_QUANT_SUM_MISMATCH", f"quantisation gap {delta} exceeds country count {n}")
    if delta > 0:
        order = sorted(range(n), key=lambda i: (-rem[i], isos[i]))
        for i in order[:delta]:
            ticks[i] += 1
    elif delta < 0:
        order = sorted(range(n), key=lambda i: (rem[i], iso_sort_key_desc(isos[i])))
        for i in order[:-delta]:
            ticks[i] -= 1
    if any(t < 0 for t in ticks):
        raise ModelError("E_QUANT_SUM_MISMATCH", "negative tick after largest-remainder correction", rows=[isos, ticks])
    return ticks, abs(delta)


@dataclass
class CurrencyResult:
    currency: str
    countries: list[str]
    weights: list[float]
    ticks: list[int]
    obs_count: int
    diag: dict[str, Any]
    is_sparse: bool
    threshold: int


def compute_currency(
    ccy: str,
    ccy_rows: dict[str, tuple[float, int]] | None,
    settle_rows: dict[str, tuple[float, int]] | None,
    policy: SmoothingPolicy,
) -> CurrencyResult:
    """§2.3 steps 2-11 for one currency (binary64, fixed A→Z order, Neumaier sums)."""
    ccy_rows = ccy_rows or {}
    settle_rows = settle_rows or {}
    # step 2: degrade (⚑5: w forced to 1 / 0)
    if ccy_rows and settle_rows:
        mode, reason, w = "none", None, float(policy.resolve(ccy, "blend_weight"))
    elif ccy_rows:
        mode, reason, w = "ccy_only", "SRC_MISSING_SETTLEMENT", 1.0
    else:
        mode, reason, w = "settlement_only", "SRC_MISSING_CCY", 0.0
    # step 3: country set = union of surfaces ∪ override keys (⚑3 HEAD widening)
    union = set(ccy_rows) | set(settle_rows)
    widen = set(policy.alpha_iso.get(ccy, {})) | set(policy.min_share_iso.get(ccy, {}))
    countries = sorted(union | widen)
    widened = sorted(widen - union)
    # step 4: blend
    q = [w * ccy_rows.get(c, (0.0, 0))[0] + (1.0 - w) * settle_rows.get(c, (0.0, 0))[0] for c in countries]
    # step 5: evidence mass
    n_ccy = sum(v[1] for v in ccy_rows.values())
    n_set = sum(v[1] for v in settle_rows.values())
    N0 = w * float(n_ccy) + (1.0 - w) * float(n_set)
    e = max(float(policy.resolve(ccy, "shrink_exponent")), 1.0)
    obs_floor = int(policy.resolve(ccy, "obs_floor"))
    power = N0 ** (1.0 / e) if N0 > 0 else 0.0
    N_eff = max(float(obs_floor), power)
    # step 6: smoothing
    alpha = [policy.alpha(ccy, c) for c in countries]
    A = neumaier(alpha)
    den = N_eff + A
    if not den > 0:
        raise ModelError("E_ZERO_MASS", f"{ccy}: smoothing denominator N_eff + A = {den!r} <= 0", rows=[ccy])
    post = [(qi * N_eff + ai) / den for qi, ai in zip(q, alpha)]
    # step 7: floors
    floors = [policy.min_share(ccy, c) for c in countries]
    pp = [max(x, f) for x, f in zip(post, floors)]
    floors_triggered = sum(1 for x, f in zip(post, floors) if x < f)
    # step 8: renormalise
    Z = neumaier(pp)
    if not Z > 0:
        raise ModelError("E_ZERO_MASS", f"{ccy}: floored mass Z = {Z!r} <= 0", rows=[ccy])
    p = [x / Z for x in pp]
    for x in p:
        if not math.isfinite(x):
            raise ModelError("E_ZERO_MASS", f"{ccy}: non-finite probability", rows=[ccy])
    # step 9: quantise
    ticks, ulps = quantise_largest_remainder(p, countries, policy.dp)
    S = 10**policy.dp
    weights = [t / S for t in ticks]
    sum_dec_ok = sum(ticks) == S
    sum_num_ok = abs(neumaier(weights) - 1.0) <= SUM_TOL
    in_range = all(0.0 <= x <= 1.0 for x in weights)
    if not (sum_dec_ok and sum_num_ok and in_range):
        raise ModelError(
            "E_QUANT_SUM_MISMATCH",
            f"{ccy}: quantised weights do not sum to 1 at dp={policy.dp}",
            rows=list(zip(countries, ticks)),
        )
    obs_round = round(N0)  # round-half-even
    overrides_applied = {
        "alpha_iso": len(policy.alpha_iso.get(ccy, {})),
        "min_share_iso": len(policy.min_share_iso.get(ccy, {})),
        "per_currency": ccy in policy.per_currency,
    }
    diag = {
        "currency": ccy,
        "countries_union_count": len(union),
        "countries_output_count": len(countries),
        "countries_widened": widened,
        "policy_narrowed": False,
        "sum_numeric_ok": sum_num_ok,
        "sum_decimal_dp_ok": sum_dec_ok,
        "largest_remainder_ulps": ulps,
        "overrides_applied": overrides_applied,
        "floors_triggered": floors_triggered,
        "degrade_mode": mode,
        "degrade_reason_code": reason,
        "N0": N0,
        "N_eff": N_eff,
        "dp": policy.dp,
    }
    return CurrencyResult(
        currency=ccy,
        countries=countries,
        weights=weights,
        ticks=ticks,
        obs_count=int(obs_round),
        diag=diag,
        is_sparse=N0 < obs_floor,
        threshold=obs_floor,
    )


def compute_weights(settle: ShareSurface, ccy: ShareSurface, policy: SmoothingPolicy) -> list[CurrencyResult]:
    """All currencies A→Z (§2.3 step 1: the union of the two surfaces)."""
    s_by = settle.by_currency()
    c_by = ccy.by_currency()
    return [compute_currency(c, c_by.get(c), s_by.get(c), policy) for c in sorted(set(s_by) | set(c_by))]


def weights_table(results: list[CurrencyResult]) -> pa.Table:
    cur, iso, w, n = [], [], [], []
    for r in results:
        for c, x in zip(r.countries, r.weights):
            cur.append(r.currency)
            iso.append(c)
            w.append(x)
            n.append(r.obs_count)
    return pa.table(
        {
            "currency": pa.array(cur, pa.string()),
            "country_iso": pa.array(iso, pa.string()),
            "weight": pa.array(w, pa.float64()),
            "obs_count": pa.array(n, pa.int64()),
            "smoothing": pa.nulls(len(cur), pa.string()),
        }
    )


def sparse_table(results: list[CurrencyResult]) -> pa.Table:
    return pa.table(
        {
            "currency": pa.array([r.currency for r in results], pa.string()),
            "is_sparse": pa.array([r.is_sparse for r in results], pa.bool_()),
            "obs_count": pa.array([r.obs_count for r in results], pa.int64()),
            "threshold": pa.array([r.threshold for r in results], pa.int64()),
        }
    )


def build_receipt(
    results: list[CurrencyResult], policy: SmoothingPolicy, parameter_hash: str, licences: dict[str, Any]
) -> dict[str, Any]:
    """``S5_VALIDATION.json`` (§2.5). No timestamps (decision 5)."""
    ulps = sorted(r.diag["largest_remainder_ulps"] for r in results)
    modes = {"none": 0, "settlement_only": 0, "ccy_only": 0}
    for r in results:
        modes[r.diag["degrade_mode"]] += 1
    overrides_count = sum(
        r.diag["overrides_applied"]["alpha_iso"]
        + r.diag["overrides_applied"]["min_share_iso"]
        + int(r.diag["overrides_applied"]["per_currency"])
        for r in results
    )
    return {
        "parameter_hash": parameter_hash,
        "policy_digest": file_sha256_hex(policy.path),
        "producer": MODULE,
        "schema_refs": {
            "settlement_shares": "engine.segment1a.s5_currency_weights.SHARE_COLUMNS",
            "ccy_country_shares": "engine.segment1a.s5_currency_weights.SHARE_COLUMNS",
            "ccy_country_weights_cache": "contracts/schemas/1A/ccy_country_weights_cache.schema.json",
            "merchant_currency": "contracts/schemas/1A/merchant_currency.schema.json",
            "sparse_flag": "contracts/schemas/1A/sparse_flag.schema.json",
        },
        "currencies_total": len(results),
        "currencies_processed": len(results),
        "rows_written": sum(len(r.countries) for r in results),
        "sum_numeric_pass": all(r.diag["sum_numeric_ok"] for r in results),
        "sum_decimal_dp_pass": all(r.diag["sum_decimal_dp_ok"] for r in results),
        "largest_remainder_total_ulps": sum(ulps),
        "largest_remainder_ulps_quantiles": {
            "p50": nearest_rank(ulps, 50),
            "p95": nearest_rank(ulps, 95),
            "p99": nearest_rank(ulps, 99),
        },
        "overrides_applied_count": overrides_count,
        "floors_triggered_count": sum(r.diag["floors_triggered"] for r in results),
        "degrade_mode_counts": modes,
        "coverage_union_pass": all(
            r.diag["countries_output_count"] >= r.diag["countries_union_count"] for r in results
        ),
        "coverage_policy_narrowed": False,
        "rng_trace_delta_events": 0,
        "rng_trace_delta_draws": 0,
        "policy_narrowed_currencies": [],
        "policy_widened_currencies": [r.currency for r in results if r.diag["countries_widened"]],
        "degraded_currencies": [
            {"currency": r.currency, "mode": r.diag["degrade_mode"], "reason_code": r.diag["degrade_reason_code"]}
            for r in results
            if r.diag["degrade_mode"] != "none"
        ],
        "licence_summary": licences,
        "by_currency": [r.diag for r in results],
        "dp": policy.dp,
    }


def derive_legal_tender(ccy: ShareSurface, settle: ShareSurface) -> tuple[dict[str, str], set[str]]:
    """Primary legal tender per country, derived from the sealed share surfaces (S5.0).

    The engine has no separate ``iso_legal_tender`` input: as upstream built it ("max share per ISO"
    of ``ccy_country_shares``), a country's currency is the one whose ``ccy_country_shares`` vector gives
    it the largest share (the settlement surface when the country is absent there); ties among maxima
    -> lexicographically smallest code (returned in the tie set). In the embedded tables every country
    belongs to exactly one currency.
    """
    tender: dict[str, str] = {}
    ties: set[str] = set()
    for surf in (ccy, settle):
        best: dict[str, tuple[float, list[str]]] = {}
        for c, i, sh in zip(surf.currency, surf.country_iso, surf.share):
            if i in tender:
                continue
            cur = best.get(i)
            if cur is None or sh > cur[0]:
                best[i] = (sh, [c])
            elif sh == cur[0]:
                cur[1].append(c)
        for i, (_, codes) in best.items():
            tender[i] = min(codes)
            if len(codes) > 1:
                ties.add(i)
    return tender, ties


def derive_merchant_currency(
    merchant_ids: np.ndarray,
    home_iso: np.ndarray,
    tender: dict[str, str],
    weight_currencies: set[str],
    path: str | None = None,
    tie_countries: set[str] | None = None,
) -> pa.Table:
    """S5.0 (§2.4): κ = legal tender of the home country; source ``home_primary_legal_tender``.

    Errors: duplicate/missing merchants ``E_MCURR_CARDINALITY``; a home country without a tender,
    or (decision 28) a κ without weights in the cache, ``E_MCURR_RESOLUTION`` listing merchants and
    countries.
    """
    from engine.segment1a.s6_foreign_selection import iso_codes, iso_list

    mid = np.asarray(merchant_ids, dtype=np.uint64)
    try:
        hc = iso_codes(home_iso if isinstance(home_iso, (pa.Array, pa.ChunkedArray)) else list(home_iso))
    except ValueError as e:
        raise InputError("E_MCURR_RESOLUTION", f"home_country_iso: {e}", path=path) from e
    order = np.argsort(mid, kind="stable")
    mid = mid[order]
    hc = hc[order]
    if mid.size and np.any(mid[1:] == mid[:-1]):
        d = np.unique(mid[1:][mid[1:] == mid[:-1]])
        raise InputError("E_MCURR_CARDINALITY", "duplicate merchant_id in the merchant table", path=path,
                         rows=[int(x) for x in d[:10]])
    uc, inv = np.unique(hc, return_inverse=True)
    uh = iso_list(uc)
    kappa_u = np.array([tender.get(h, "") for h in uh], dtype=object)
    no_tender = [h for h, k in zip(uh, kappa_u) if k == ""]

    def examples(h: str) -> str:
        ms = mid[hc == iso_codes([h])[0]][:3]
        return ", ".join(str(int(m)) for m in ms)

    if no_tender:
        rows = [f"home_country_iso {h}: no currency (merchants {examples(h)} ...)" for h in no_tender]
        raise InputError("E_MCURR_RESOLUTION", "home countries without a legal-tender currency", path=path, rows=rows,
                         detail={"countries": no_tender})
    no_weights = sorted({(k, h) for h, k in zip(uh, kappa_u) if k not in weight_currencies})
    if no_weights:
        rows = [f"currency {k} of home {h} has no weights (merchants {examples(h)} ...)" for k, h in no_weights]
        raise InputError(
            "E_MCURR_RESOLUTION",
            "merchant currencies missing from the currency->country weights (decision 28)",
            path=path,
            rows=rows,
            detail={"currencies": sorted({k for k, _ in no_weights}), "countries": sorted({h for _, h in no_weights})},
        )
    kappa = pa.array(kappa_u.astype(str), pa.string()).take(pa.array(inv.astype(np.int64)))
    n = mid.size
    return pa.table(
        {
            "merchant_id": pa.array(mid, pa.uint64()),
            "kappa": kappa,
            "source": pa.array(np.full(n, "home_primary_legal_tender", dtype=object), pa.string()),
            "tie_break_used": pa.array(
                np.array([h in (tie_countries or set()) for h in uh], dtype=bool)[inv], pa.bool_()
            ),
        }
    )


# --------------------------------------------------------------------------------------------
# reading back (S6/S7)
# --------------------------------------------------------------------------------------------


def read_weights(ctx) -> pa.Table:
    """Gate (recompute the S5 flag) then read the weights cache (§2.5: readers MUST verify)."""
    from engine.core import publish

    folder = ctx.path("ccy_country_weights_cache")
    verify_receipt(folder, [RECEIPT_NAME], "S5 ccy_country_weights_cache")
    return publish.read_parquet_dir(folder)


def read_merchant_currency(ctx) -> pa.Table:
    from engine.core import publish

    return publish.read_parquet_dir(ctx.path("merchant_currency"))


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------


def _iso_set(ctx) -> set[str]:
    from engine.segment1a import inputs

    return set(str(x) for x in inputs.iso_codes(inputs.load_iso_table(ctx.config["segment1a"]["inputs"]["iso_table"])))


def _merchants(ctx) -> tuple[np.ndarray, Any, str]:
    """The run's merchant universe: S0's ``hurdle_design_matrix`` (after any decision-11 drop)."""
    from engine.segment1a.s6_foreign_selection import iso_strings, read_merchant_homes

    mid, home = read_merchant_homes(ctx)
    return mid, iso_strings(home), str(ctx.path("hurdle_design_matrix"))


def run(ctx) -> None:
    from engine.core import publish
    from engine.core.schema import arrow_schema, validate_table

    params = ctx.config["segment1a"]["parameters"]
    iso_set = _iso_set(ctx)
    settle = load_share_surface("settlement_shares", params["settlement_shares.csv"], iso_set)
    ccy = load_share_surface("ccy_country_shares", params["ccy_country_shares.csv"], iso_set)
    pol_path = params["ccy_smoothing_params.yaml"]
    policy = parse_smoothing_policy(
        load_strict_yaml(pol_path, "E_POLICY_DOMAIN"), pol_path, iso_set, set(settle.currency) | set(ccy.currency)
    )
    results = compute_weights(settle, ccy, policy)
    wt = weights_table(results)
    sp = sparse_table(results)
    # The receipt lives under parameter_hash= and may depend on nothing else (decision 13): licences
    # are recorded in the files' *.provenance.json, which parameter_hash does not seal, so they are
    # referenced, not copied.
    licences = {name: "see the file's provenance record (not sealed by parameter_hash)"
                for name in ("ccy_country_shares.csv", "settlement_shares.csv")}
    receipt = build_receipt(results, policy, ctx.ids.parameter_hash, licences)

    mid, home, mpath = _merchants(ctx)
    tender, ties = derive_legal_tender(ccy, settle)
    mc = derive_merchant_currency(mid, home, tender, {r.currency for r in results}, path=mpath, tie_countries=ties)

    # guard-before-emit: validate every table before the first publish
    for name, tbl in (("ccy_country_weights_cache", wt), ("sparse_flag", sp), ("merchant_currency", mc)):
        probs = validate_table(tbl, schema_path(ctx, name))
        if probs:
            raise ModelError("E_OUTPUT_SCHEMA", f"{name} does not match its schema", rows=probs)

    code = "E_IMMUTABLE_PARTITION_EXISTS_NONIDENTICAL"
    with publish.staged(ctx.path("ccy_country_weights_cache"), code) as tmp:
        publish.write_parquet(
            wt, tmp / "part-00000.parquet", sort_by=["currency", "country_iso"],
            schema=arrow_schema(schema_path(ctx, "ccy_country_weights_cache")),
        )
        write_json_file(receipt, tmp / RECEIPT_NAME)
        (tmp / FLAG_NAME).write_bytes(flag_text(receipt_digest(tmp, [RECEIPT_NAME])))
    with publish.staged(ctx.path("sparse_flag"), code) as tmp:
        publish.write_parquet(
            sp, tmp / "part-00000.parquet", sort_by=["currency"], schema=arrow_schema(schema_path(ctx, "sparse_flag"))
        )
    with publish.staged(ctx.path("merchant_currency"), code) as tmp:
        publish.write_parquet(
            mc, tmp / "part-00000.parquet", sort_by=["merchant_id"],
            schema=arrow_schema(schema_path(ctx, "merchant_currency")),
        )
