"""1A S3 — cross-border candidate set, its order, and the optional priors / counts / sequence lanes.

Spec: ``1A-S1-S4.md`` §3 (and README decisions 8, 10, 13, 20, 28). S3 consumes no RNG and writes no
events. It has two entry points so that a seed change never recomputes the parameter-scoped part
(decision 13):

* :func:`run_candidates` -> ``s3_candidate_set`` and, with ``options.s3_priors``, ``s3_base_weight_priors``
  (``parameter_hash=/fingerprint=``). Their bytes may depend only on parameters and reference tables,
  never on a draw. Two consequences, both decisions of this module:

  - **Every merchant of the (S0-accepted) merchant table gets candidate rows, single-site ones too.**
    Whether a merchant is multi-site is an S1 *draw*; restricting the set to multi-site merchants would
    make a parameter-scoped dataset depend on the seed. Consumers (S4, S6, S7, S8) select the merchants
    they need by ``is_multi`` / ``nb_final``; a single-site merchant's rows are never read.
  - **The rule ladder may not use ``N_GE``**: ``N`` is the S2 draw, so an ``N_GE`` predicate would make
    the candidate set seed-dependent. A ladder using it is rejected at load time
    (``ERR_S3_RULE_LADDER_INVALID``) with that explanation, rather than silently ignored.

* :func:`run_lanes` -> ``s3_integerised_counts`` (``options.s3_integerisation``) and ``s3_site_sequence``
  (``options.s3_sequencing``, which requires integerisation) under ``seed=/parameter_hash=/fingerprint=``:
  they need ``N`` (``nb_final``), so they exist for multi-site merchants only (a single-site merchant has
  no S2 event and exactly one home outlet, decision 6/19).

Everything is vectorised over merchants: the ladder is evaluated rule by rule on whole columns; merchants
are grouped by their *fired pattern* (which rules fired — a handful of distinct patterns), candidate lists
are built once per pattern and expanded with ``np.repeat``; the integerisation is one numba kernel over
merchant segments (serial Neumaier sums, spec §0 numeric profile).

Policy loaders (``load_rule_ladder``, ``load_base_weight``, ``load_thresholds``, ``load_bounds``) validate
their files and raise :class:`InputError` with the spec's S3 codes naming the file (decision 28: a rule
that can never match its vocabulary is an error, not a silent no-op).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from engine.core.errors import InputError, ModelError

# --------------------------------------------------------------------------------------------------
# constants (spec §3.2)
# --------------------------------------------------------------------------------------------------

PRECEDENCE_CLASSES = ("DENY", "ALLOW", "CLASS", "LEGAL", "THRESHOLD", "DEFAULT")
CHANNELS = ("CP", "CNP")  # decision 28: the one internal channel vocabulary
PREDICATE_OPS = ("TRUE", "IN_SET", "CHANNEL_IN", "MCC_IN", "N_GE", "AND", "OR", "NOT")
RESIDUAL_DP = 8  # §3.3 S3.5: dp_resid = 8 is binding for S3 (§6 C14)
SITE_ID_MAX = 999_999  # §3.3 S3.6: 6-digit site_id
_RULE_ID_RE = re.compile(r"^[A-Z0-9_]+$")
_ISO_RE = re.compile(r"^[A-Z]{2}$")
_MCC_RE = re.compile(r"^[0-9]{4}$")
_MCC_RANGE_RE = re.compile(r"^([0-9]{4})-([0-9]{4})$")
_SEMVER_RE = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+$")

DATASETS = ("s3_candidate_set", "s3_base_weight_priors", "s3_integerised_counts", "s3_site_sequence")
_SORT = {
    "s3_candidate_set": ["merchant_id", "candidate_rank", "country_iso"],
    "s3_base_weight_priors": ["merchant_id", "country_iso"],
    "s3_integerised_counts": ["merchant_id", "country_iso"],
    "s3_site_sequence": ["merchant_id", "country_iso", "site_order"],
}


def _err(code: str, msg: str, path: Any = None, rows: Iterable[Any] | None = None, detail: dict | None = None):
    return InputError(code, msg, path=path, rows=rows, detail=detail)


def _read_yaml(path: str | Path, code: str) -> Any:
    try:
        with open(path, "rb") as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise _err(code, f"cannot read policy file: {e}", path) from e
    except yaml.YAMLError as e:
        raise _err(code, f"policy file is not valid YAML: {e}", path) from e


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_keys(obj: Any, where: str, required: Sequence[str], optional: Sequence[str], code: str, path) -> None:
    if not isinstance(obj, dict):
        raise _err(code, f"{where} must be a mapping", path)
    missing = [k for k in required if k not in obj]
    unknown = sorted(str(k) for k in obj if k not in required and k not in optional)
    if missing:
        raise _err(code, f"{where}: missing required key(s) {missing}", path)
    if unknown:
        raise _err(code, f"{where}: unknown key(s) {unknown} (closed schema)", path)


# --------------------------------------------------------------------------------------------------
# rule ladder (spec §3.2 policy.s3.rule_ladder.yaml, §3.3 S3.0 load-time validity)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    rule_id: str
    precedence: str
    precedence_rank: int
    priority: int
    is_decision_bearing: bool
    predicate: tuple  # normalised predicate tree (see _parse_predicate)
    reason_code: str
    tags: tuple[str, ...]
    admit: tuple[str, ...]  # expanded admit_sets ∪ admit_countries, A→Z
    deny: tuple[str, ...]  # expanded deny_sets ∪ deny_countries, A→Z
    row_tags: tuple[str, ...]

    @property
    def admit_bearing(self) -> bool:
        return len(self.admit) > 0


@dataclass(frozen=True)
class RuleLadder:
    """A validated ladder. ``rules`` are in the total order ``(precedence_rank, priority, rule_id)``
    (the ``rule_trace`` order of S3.1); ``rules[j]`` is bit ``j`` of a merchant's fired pattern."""

    precedence_order: tuple[str, ...]
    reason_codes: tuple[str, ...]
    filter_tags: tuple[str, ...]
    country_sets: dict
    reason_code_to_rule_id: dict
    rules: tuple[Rule, ...]
    path: str | None = None


def _parse_predicate(node: Any, ctx: dict, where: str) -> tuple:
    """Closed DSL (§3.2): returns a normalised tuple tree; raises on anything outside the vocabulary."""
    path = ctx["path"]
    if not isinstance(node, dict) or "op" not in node:
        raise _err("ERR_S3_RULE_LADDER_INVALID", f"{where}: predicate must be a mapping with 'op'", path)
    op = node["op"]
    if op not in PREDICATE_OPS:
        raise _err("ERR_S3_RULE_LADDER_INVALID", f"{where}: unknown predicate op {op!r} (closed DSL {list(PREDICATE_OPS)})", path)
    if op == "TRUE":
        _check_keys(node, where, ["op"], [], "ERR_S3_RULE_LADDER_INVALID", path)
        return ("TRUE",)
    if op == "IN_SET":
        _check_keys(node, where, ["op", "field", "set"], [], "ERR_S3_RULE_LADDER_INVALID", path)
        if node["field"] != "home_country_iso":
            raise _err("ERR_S3_RULE_LADDER_INVALID", f"{where}: IN_SET field must be 'home_country_iso', got {node['field']!r}", path)
        name = node["set"]
        if name not in ctx["country_sets"]:
            raise _err("ERR_S3_POLICY_REFERENCE_INVALID", f"{where}: IN_SET references undefined country set {name!r}", path,
                       detail={"defined_sets": sorted(ctx["country_sets"])})
        return ("IN_SET", tuple(ctx["country_sets"][name]))
    if op == "CHANNEL_IN":
        _check_keys(node, where, ["op", "values"], [], "ERR_S3_RULE_LADDER_INVALID", path)
        vals = node["values"]
        if not isinstance(vals, list) or not vals:
            raise _err("ERR_S3_RULE_LADDER_INVALID", f"{where}: CHANNEL_IN values must be a non-empty list", path)
        bad = [v for v in vals if v not in CHANNELS]
        if bad:
            raise _err("ERR_S3_RULE_LADDER_INVALID",
                       f"{where}: CHANNEL_IN values {bad} are outside the channel vocabulary {list(CHANNELS)} "
                       "(decision 28: policies use CP/CNP; such a rule could never match)", path, rows=bad)
        return ("CHANNEL_IN", tuple(sorted(set(vals))))
    if op == "MCC_IN":
        _check_keys(node, where, ["op"], ["codes", "ranges"], "ERR_S3_RULE_LADDER_INVALID", path)
        codes_in = node.get("codes") or []
        ranges_in = node.get("ranges") or []
        if not isinstance(codes_in, list) or not isinstance(ranges_in, list) or not (codes_in or ranges_in):
            raise _err("ERR_S3_RULE_LADDER_INVALID", f"{where}: MCC_IN needs a non-empty 'codes' and/or 'ranges' list", path)
        vocab = ctx["mcc_vocab"]
        codes: list[int] = []
        for c in codes_in:
            s = f"{c:04d}" if _is_int(c) and 0 <= c <= 9999 else str(c)
            if not _MCC_RE.match(s):
                raise _err("ERR_S3_RULE_LADDER_INVALID", f"{where}: MCC code {c!r} is not a 4-digit code", path, rows=[c])
            v = int(s)
            if vocab is not None and v not in vocab:
                raise _err("ERR_S3_RULE_LADDER_INVALID",
                           f"{where}: MCC {s} is not in the MCC vocabulary (coefficient dict_mcc); the rule could never match it",
                           path, rows=[s])
            codes.append(v)
        ranges: list[tuple[int, int]] = []
        for r in ranges_in:
            m = _MCC_RANGE_RE.match(str(r))
            if not m or int(m.group(1)) > int(m.group(2)):
                raise _err("ERR_S3_RULE_LADDER_INVALID", f"{where}: MCC range {r!r} is not 'NNNN-MMMM' with NNNN <= MMMM", path, rows=[r])
            lo, hi = int(m.group(1)), int(m.group(2))
            if vocab is not None and not any(lo <= v <= hi for v in vocab):
                raise _err("ERR_S3_RULE_LADDER_INVALID",
                           f"{where}: MCC range {r} contains no MCC of the vocabulary; the rule could never match it",
                           path, rows=[r])
            ranges.append((lo, hi))
        return ("MCC_IN", tuple(sorted(set(codes))), tuple(sorted(set(ranges))))
    if op == "N_GE":
        # N is drawn by S2 (seed-dependent); the candidate set is parameter-scoped (decision 13).
        raise _err("ERR_S3_RULE_LADDER_INVALID",
                   f"{where}: N_GE predicates are not supported: N is an S2 draw, and the candidate set must not depend "
                   "on the seed (decision 13; its path carries no seed=). Express the rule without N.", path)
    if op in ("AND", "OR"):
        _check_keys(node, where, ["op", "args"], [], "ERR_S3_RULE_LADDER_INVALID", path)
        args = node["args"]
        if not isinstance(args, list) or not args:
            raise _err("ERR_S3_RULE_LADDER_INVALID", f"{where}: {op} needs a non-empty 'args' list", path)
        return (op, tuple(_parse_predicate(a, ctx, f"{where}.args[{i}]") for i, a in enumerate(args)))
    # NOT
    _check_keys(node, where, ["op", "arg"], [], "ERR_S3_RULE_LADDER_INVALID", path)
    return ("NOT", _parse_predicate(node["arg"], ctx, f"{where}.arg"))


def _str_list(x: Any, where: str, path, code="ERR_S3_RULE_LADDER_INVALID") -> list[str]:
    if x is None:
        return []
    if not isinstance(x, list) or not all(isinstance(v, str) for v in x):
        raise _err(code, f"{where} must be a list of strings", path)
    return list(x)


def parse_rule_ladder(doc: Any, iso_set: Iterable[str], mcc_vocab: Iterable[int] | None = None,
                      path: str | Path | None = None) -> RuleLadder:
    """Validate a HEAD-layout rule ladder (§3.2) against the ISO set and (optionally) the MCC vocabulary.

    Errors (run-scoped, §3.3 S3.0 Decision): ``ERR_S3_RULE_LADDER_INVALID`` (structure, closed vocabularies,
    duplicate rule ids, DEFAULT rule, reason-code map), ``ERR_S3_POLICY_REFERENCE_INVALID`` (undefined set or
    rule referenced), ``ERR_S3_COUNTRY_CODE_INVALID`` (a country outside the ISO set).
    """
    P = str(path) if path is not None else None
    iso = set(iso_set)
    vocab = None if mcc_vocab is None else set(int(v) for v in mcc_vocab)
    code = "ERR_S3_RULE_LADDER_INVALID"
    _check_keys(doc, "rule ladder", ["precedence_order", "reason_codes", "filter_tags", "reason_code_to_rule_id", "rules"],
                ["semver", "version", "country_sets", "description", "notes"], code, P)
    prec = _str_list(doc["precedence_order"], "precedence_order", P)
    if sorted(prec) != sorted(PRECEDENCE_CLASSES) or len(prec) != len(PRECEDENCE_CLASSES):
        raise _err(code, f"precedence_order must list each of {list(PRECEDENCE_CLASSES)} exactly once, got {prec}", P)
    reason_codes = _str_list(doc["reason_codes"], "reason_codes", P)
    if len(set(reason_codes)) != len(reason_codes) or not reason_codes:
        raise _err(code, "reason_codes must be a non-empty list of distinct codes", P, rows=reason_codes)
    filter_tags = _str_list(doc["filter_tags"], "filter_tags", P)
    if len(set(filter_tags)) != len(filter_tags) or "HOME" not in filter_tags:
        raise _err(code, "filter_tags must be distinct and contain HOME", P, rows=filter_tags)

    sets_in = doc.get("country_sets") or {}
    if not isinstance(sets_in, dict):
        raise _err(code, "country_sets must be a mapping NAME -> [ISO2]", P)
    country_sets: dict[str, tuple[str, ...]] = {}
    for name in sorted(sets_in):
        members = _str_list(sets_in[name], f"country_sets.{name}", P)
        bad = sorted({c for c in members if c not in iso})
        if bad:
            raise _err("ERR_S3_COUNTRY_CODE_INVALID", f"country_sets.{name}: codes not in the ISO table", P, rows=bad)
        country_sets[str(name)] = tuple(sorted(set(members)))

    pctx = {"path": P, "country_sets": country_sets, "mcc_vocab": vocab}
    rules_in = doc["rules"]
    if not isinstance(rules_in, list) or not rules_in:
        raise _err(code, "rules must be a non-empty list", P)
    seen: dict[str, int] = {}
    dups: list[str] = []
    rules: list[Rule] = []
    for i, r in enumerate(rules_in):
        where = f"rules[{i}]"
        _check_keys(r, where, ["rule_id", "precedence", "priority", "is_decision_bearing", "predicate", "outcome"],
                    ["admit_sets", "admit_countries", "deny_sets", "deny_countries", "row_tags", "description"], code, P)
        rid = r["rule_id"]
        if not isinstance(rid, str) or not _RULE_ID_RE.match(rid):
            raise _err(code, f"{where}: rule_id {rid!r} must match ^[A-Z0-9_]+$", P)
        where = f"rule {rid}"
        if rid in seen:
            dups.append(rid)
        seen[rid] = i
        if r["precedence"] not in PRECEDENCE_CLASSES:
            raise _err(code, f"{where}: precedence {r['precedence']!r} not in {list(PRECEDENCE_CLASSES)}", P)
        if not _is_int(r["priority"]) or not (0 <= r["priority"] < 2**31):
            raise _err(code, f"{where}: priority must be an integer in [0, 2^31)", P)
        if not isinstance(r["is_decision_bearing"], bool):
            raise _err(code, f"{where}: is_decision_bearing must be a boolean", P)
        pred = _parse_predicate(r["predicate"], pctx, f"{where}.predicate")
        out = r["outcome"]
        _check_keys(out, f"{where}.outcome", ["reason_code", "tags"], [], code, P)
        if out["reason_code"] not in reason_codes:
            raise _err(code, f"{where}: outcome.reason_code {out['reason_code']!r} not in reason_codes", P)
        tags = _str_list(out["tags"], f"{where}.outcome.tags", P)
        row_tags = _str_list(r.get("row_tags"), f"{where}.row_tags", P)
        bad_tags = sorted({t for t in tags + row_tags if t not in filter_tags})
        if bad_tags:
            raise _err(code, f"{where}: tags outside the closed filter_tags vocabulary", P, rows=bad_tags)

        def expand(sets_key: str, countries_key: str) -> tuple[str, ...]:
            out_c: set[str] = set()
            for s in _str_list(r.get(sets_key), f"{where}.{sets_key}", P):
                if s not in country_sets:
                    raise _err("ERR_S3_POLICY_REFERENCE_INVALID", f"{where}.{sets_key}: undefined country set {s!r}", P)
                out_c.update(country_sets[s])
            cs = _str_list(r.get(countries_key), f"{where}.{countries_key}", P)
            bad = sorted({c for c in cs if c not in iso})
            if bad:
                raise _err("ERR_S3_COUNTRY_CODE_INVALID", f"{where}.{countries_key}: codes not in the ISO table", P, rows=bad)
            out_c.update(cs)
            return tuple(sorted(out_c))

        rules.append(Rule(rid, r["precedence"], prec.index(r["precedence"]), int(r["priority"]), r["is_decision_bearing"],
                          pred, out["reason_code"], tuple(sorted(set(tags))), expand("admit_sets", "admit_countries"),
                          expand("deny_sets", "deny_countries"), tuple(sorted(set(row_tags)))))
    if dups:
        raise _err(code, "duplicate rule_id(s)", P, rows=sorted(set(dups)))

    defaults = [r for r in rules if r.precedence == "DEFAULT" and r.is_decision_bearing]
    if len(defaults) != 1:
        raise _err(code, f"exactly one decision-bearing DEFAULT rule is required, found {len(defaults)}", P,
                   rows=[r.rule_id for r in defaults])
    if defaults[0].predicate != ("TRUE",):
        raise _err(code, f"the DEFAULT rule {defaults[0].rule_id} must always fire (predicate {{op: TRUE}})", P)

    m = doc["reason_code_to_rule_id"]
    if not isinstance(m, dict):
        raise _err(code, "reason_code_to_rule_id must be a mapping", P)
    missing = [c for c in reason_codes if c not in m]
    extra = sorted(str(c) for c in m if c not in reason_codes)
    if missing or extra:
        raise _err(code, "reason_code_to_rule_id must be total over reason_codes (and nothing else)", P,
                   detail={"missing": missing, "unknown": extra})
    vals = [m[c] for c in reason_codes]
    if len(set(vals)) != len(vals):
        raise _err(code, "reason_code_to_rule_id must be one-to-one", P, rows=vals)
    unknown_rules = sorted({v for v in vals if v not in seen})
    if unknown_rules:
        raise _err("ERR_S3_POLICY_REFERENCE_INVALID", "reason_code_to_rule_id names rule ids that do not exist", P,
                   rows=unknown_rules)
    # the map is the ordering authority (S3.3 Key1): a rule's own code must map back to it
    incoherent = [f"{r.rule_id}: {r.reason_code} -> {m[r.reason_code]}" for r in rules if m[r.reason_code] != r.rule_id]
    if incoherent:
        raise _err(code, "outcome.reason_code of a rule must map back to that rule in reason_code_to_rule_id", P,
                   rows=incoherent)

    rules.sort(key=lambda r: (r.precedence_rank, r.priority, r.rule_id))
    return RuleLadder(tuple(prec), tuple(reason_codes), tuple(filter_tags), country_sets, dict(m), tuple(rules), P)


def load_rule_ladder(path: str | Path, iso_set: Iterable[str], mcc_vocab: Iterable[int] | None = None) -> RuleLadder:
    return parse_rule_ladder(_read_yaml(path, "ERR_S3_RULE_LADDER_INVALID"), iso_set, mcc_vocab, path)


# --------------------------------------------------------------------------------------------------
# base weight / thresholds / bounds policies
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseWeightPolicy:
    dp: int
    beta0: float
    beta_home: float
    beta_rank: float
    log_w_min: float
    log_w_max: float
    w_min: float
    w_max: float
    path: str | None = None


def _finite_number(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(float(x))


def parse_base_weight(doc: Any, path: str | Path | None = None) -> BaseWeightPolicy:
    """HEAD ``policy.s3.base_weight.yaml`` (§3.2; §6 C9). Any defect -> ``ERR_S3_WEIGHT_CONFIG``."""
    P = str(path) if path is not None else None
    code = "ERR_S3_WEIGHT_CONFIG"
    _check_keys(doc, "base_weight policy", ["dp", "model", "bounds"], ["version", "semver", "description", "notes"], code, P)
    if "version" in doc and not (isinstance(doc["version"], str) and _SEMVER_RE.match(doc["version"])):
        raise _err(code, "version must be a semver string 'X.Y.Z'", P)
    dp = doc["dp"]
    if not _is_int(dp) or not (0 <= dp <= 255):
        raise _err(code, f"dp must be an integer in 0..255, got {dp!r}", P)
    model = doc["model"]
    _check_keys(model, "model", ["kind", "coeffs"], [], code, P)
    if model["kind"] != "loglinear_rank_home":
        raise _err(code, f"model.kind must be 'loglinear_rank_home', got {model['kind']!r}", P)
    co = model["coeffs"]
    _check_keys(co, "model.coeffs", ["beta0", "beta_home", "beta_rank"], [], code, P)
    b = doc["bounds"]
    _check_keys(b, "bounds", ["log_w_min", "log_w_max", "w_min", "w_max"], [], code, P)
    for k, v in list(co.items()) + list(b.items()):
        if not _finite_number(v):
            raise _err(code, f"{k} must be a finite number, got {v!r}", P)
    lo, hi, wmin, wmax = (float(b[k]) for k in ("log_w_min", "log_w_max", "w_min", "w_max"))
    if not (lo <= hi and 0.0 < wmin <= wmax):
        raise _err(code, "bounds must satisfy log_w_min <= log_w_max and 0 < w_min <= w_max", P, detail=dict(b))
    if wmin < 10.0 ** (-dp):
        # §3.3 S3.4: "choose w_min >= 10^-dp so no prior quantises to zero"
        raise _err(code, f"w_min={wmin!r} is below 10^-dp (dp={dp}): a prior could quantise to zero", P)
    return BaseWeightPolicy(int(dp), float(co["beta0"]), float(co["beta_home"]), float(co["beta_rank"]), lo, hi, wmin, wmax, P)


def load_base_weight(path: str | Path) -> BaseWeightPolicy:
    return parse_base_weight(_read_yaml(path, "ERR_S3_WEIGHT_CONFIG"), path)


@dataclass(frozen=True)
class ThresholdsPolicy:
    enabled: bool
    home_min: int = 0
    force_foreign: bool = False
    min_one_per_country: bool = False
    foreign_cap_mode: str = "none"  # none | n_minus_home_min
    path: str | None = None


UNBOUNDED = ThresholdsPolicy(enabled=False)

_THRESH_CODE = "ERR_S3_POLICY_REFERENCE_INVALID"  # the spec names no thresholds-specific code (documented choice)


def parse_thresholds(doc: Any, path: str | Path | None = None) -> ThresholdsPolicy:
    """HEAD ``policy.s3.thresholds.yaml`` (§3.2, unknown keys rejected; §6 C8)."""
    P = str(path) if path is not None else None
    keys = ["enabled", "home_min", "force_at_least_one_foreign_if_foreign_present", "min_one_per_country_when_feasible",
            "foreign_cap_mode", "on_infeasible"]
    _check_keys(doc, "thresholds policy", keys, ["semver", "version", "description", "notes"], _THRESH_CODE, P)
    for k in ("enabled", "force_at_least_one_foreign_if_foreign_present", "min_one_per_country_when_feasible"):
        if not isinstance(doc[k], bool):
            raise _err(_THRESH_CODE, f"{k} must be a boolean", P)
    if not _is_int(doc["home_min"]) or doc["home_min"] < 0:
        raise _err(_THRESH_CODE, "home_min must be an integer >= 0", P)
    if doc["foreign_cap_mode"] not in ("none", "n_minus_home_min"):
        raise _err(_THRESH_CODE, "foreign_cap_mode must be 'none' or 'n_minus_home_min'", P)
    if doc["on_infeasible"] != "fail":
        raise _err(_THRESH_CODE, "on_infeasible must be 'fail' (the only value in v1)", P)
    return ThresholdsPolicy(doc["enabled"], int(doc["home_min"]), doc["force_at_least_one_foreign_if_foreign_present"],
                            doc["min_one_per_country_when_feasible"], doc["foreign_cap_mode"], P)


def load_thresholds(path: str | Path) -> ThresholdsPolicy:
    return parse_thresholds(_read_yaml(path, _THRESH_CODE), path)


@dataclass(frozen=True)
class BoundsPolicy:
    default_upper: int
    overrides: dict
    path: str | None = None

    def caps_for(self, iso_codes: Sequence[str]) -> np.ndarray:
        return np.array([self.overrides.get(c, self.default_upper) for c in iso_codes], dtype=np.int64)


def parse_bounds(doc: Any, iso_set: Iterable[str], path: str | Path | None = None) -> BoundsPolicy:
    """Runbook-era per-country caps ``policy.s3.bounds.yaml`` (§3.2; intersected into U, §3.3 S3.5 Decision)."""
    P = str(path) if path is not None else None
    iso = set(iso_set)
    _check_keys(doc, "bounds policy", ["default_upper"], ["semver", "version", "overrides", "description", "notes"], _THRESH_CODE, P)
    du = doc["default_upper"]
    if not _is_int(du) or du < 0:
        raise _err(_THRESH_CODE, "default_upper must be an integer >= 0", P)
    ov = doc.get("overrides") or {}
    if not isinstance(ov, dict):
        raise _err(_THRESH_CODE, "overrides must be a mapping ISO2 -> integer cap", P)
    bad_iso = sorted(str(k) for k in ov if not (isinstance(k, str) and k in iso))
    if bad_iso:
        raise _err("ERR_S3_COUNTRY_CODE_INVALID", "bounds overrides name countries not in the ISO table", P, rows=bad_iso)
    bad_v = sorted(f"{k}: {v!r}" for k, v in ov.items() if not (_is_int(v) and v >= 0))
    if bad_v:
        raise _err(_THRESH_CODE, "bounds overrides must be integers >= 0", P, rows=bad_v)
    return BoundsPolicy(int(du), {str(k): int(v) for k, v in sorted(ov.items())}, P)


def load_bounds(path: str | Path, iso_set: Iterable[str]) -> BoundsPolicy:
    return parse_bounds(_read_yaml(path, _THRESH_CODE), iso_set, path)


# --------------------------------------------------------------------------------------------------
# S3.1 - S3.3: ladder evaluation, candidate universe, ordering (vectorised)
# --------------------------------------------------------------------------------------------------


def _eval_predicate(pred: tuple, home_code: np.ndarray, channel_code: np.ndarray, mcc: np.ndarray,
                    iso_index: dict) -> np.ndarray:
    op = pred[0]
    n = home_code.shape[0]
    if op == "TRUE":
        return np.ones(n, dtype=bool)
    if op == "IN_SET":
        return np.isin(home_code, np.array([iso_index[c] for c in pred[1]], dtype=np.int32))
    if op == "CHANNEL_IN":
        return np.isin(channel_code, np.array([CHANNELS.index(c) for c in pred[1]], dtype=np.int8))
    if op == "MCC_IN":
        m = np.isin(mcc, np.array(pred[1], dtype=np.int64))
        for lo, hi in pred[2]:
            m |= (mcc >= lo) & (mcc <= hi)
        return m
    if op == "AND":
        m = np.ones(n, dtype=bool)
        for a in pred[1]:
            m &= _eval_predicate(a, home_code, channel_code, mcc, iso_index)
        return m
    if op == "OR":
        m = np.zeros(n, dtype=bool)
        for a in pred[1]:
            m |= _eval_predicate(a, home_code, channel_code, mcc, iso_index)
        return m
    if op == "NOT":
        return ~_eval_predicate(pred[1], home_code, channel_code, mcc, iso_index)
    raise AssertionError(op)  # pragma: no cover - parse_rule_ladder admits nothing else


def evaluate_ladder(ladder: RuleLadder, home_code: np.ndarray, channel_code: np.ndarray, mcc: np.ndarray,
                    iso_list: Sequence[str]) -> np.ndarray:
    """Fired matrix ``(n_merchants, n_rules)``, columns in the ladder's total order (S3.1)."""
    iso_index = {c: i for i, c in enumerate(iso_list)}
    cols = [_eval_predicate(r.predicate, home_code, channel_code, mcc, iso_index) for r in ladder.rules]
    return np.stack(cols, axis=1) if cols else np.zeros((home_code.shape[0], 0), dtype=bool)


def decide(ladder: RuleLadder, fired: Sequence[bool]) -> tuple[bool, int]:
    """S3.1 Decision for one fired pattern: (eligible_crossborder, index of the deciding rule).

    First decision-bearing DENY (in rule_trace order) => False; else first decision-bearing ALLOW => True;
    else the first decision-bearing CLASS/LEGAL/THRESHOLD/DEFAULT rule decides: True iff it carries an admit
    directive, DEFAULT => False. DENY beats ALLOW whatever their priorities or precedence_order.
    """
    db = [j for j, r in enumerate(ladder.rules) if fired[j] and r.is_decision_bearing]
    for cls in ("DENY", "ALLOW"):
        for j in db:
            if ladder.rules[j].precedence == cls:
                return cls == "ALLOW", j
    for j in db:  # DEFAULT always fires, so db is never empty for a validated ladder
        r = ladder.rules[j]
        return (r.admit_bearing and r.precedence != "DEFAULT"), j
    raise AssertionError("no decision-bearing rule fired")  # pragma: no cover


class _ListRegistry:
    """Interns sorted string tuples so list columns are built once and gathered with ``take``."""

    def __init__(self) -> None:
        self.index: dict[tuple[str, ...], int] = {}
        self.items: list[list[str]] = []

    def id(self, values: Iterable[str]) -> int:
        key = tuple(sorted(set(values)))
        if key not in self.index:
            self.index[key] = len(self.items)
            self.items.append(list(key))
        return self.index[key]

    def array(self) -> pa.Array:
        return pa.array(self.items, type=pa.list_(pa.string()))


@dataclass
class CandidateSet:
    """Columnar candidate set: rows sorted by (merchant_id, candidate_rank); home row first per merchant."""

    merchant_id: np.ndarray  # uint64 per row
    country_code: np.ndarray  # int32 index into iso_list per row
    candidate_rank: np.ndarray  # int32
    is_home: np.ndarray  # bool
    reason_idx: np.ndarray  # int32 index into reason_lists
    tag_idx: np.ndarray  # int32 index into tag_lists
    iso_list: tuple[str, ...]
    reason_lists: pa.Array
    tag_lists: pa.Array
    merchants: np.ndarray  # uint64, sorted ascending (one per merchant)
    offsets: np.ndarray  # int64 (n_merchants + 1): rows of merchant i are offsets[i]:offsets[i+1]
    eligible: np.ndarray  # bool per merchant (ladder verdict)
    n_foreign: np.ndarray  # int32 per merchant (A)

    def country_iso(self) -> pa.Array:
        return pa.array(list(self.iso_list), pa.string()).take(pa.array(self.country_code, pa.int32()))

    def table(self, parameter_hash: str, fingerprint: str | None) -> pa.Table:
        n = self.merchant_id.shape[0]
        return pa.table({
            "merchant_id": pa.array(self.merchant_id, type=pa.uint64()),
            "country_iso": self.country_iso(),
            "candidate_rank": pa.array(self.candidate_rank, type=pa.int32()),
            "is_home": pa.array(self.is_home, type=pa.bool_()),
            "reason_codes": self.reason_lists.take(pa.array(self.reason_idx, type=pa.int32())),
            "filter_tags": self.tag_lists.take(pa.array(self.tag_idx, type=pa.int32())),
            "parameter_hash": _const(parameter_hash, n),
            "produced_by_fingerprint": _const(fingerprint, n),
        })


def _const(value: str | None, n: int) -> pa.Array:
    """A constant string column, built from buffers (one memcpy) rather than n Python objects."""
    if value is None:
        return pa.nulls(n, pa.string())
    b = value.encode("utf-8")
    if n * len(b) >= 2**31:
        return pa.repeat(pa.scalar(value, pa.string()), n)
    offsets = np.arange(0, (n + 1) * len(b), len(b), dtype=np.int32) if b else np.zeros(n + 1, np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(b * n))


def _one_array(col: Any) -> pa.Array:
    """A single Arrow array from an Array / ChunkedArray (dictionary chunks re-encoded when they differ)."""
    if not isinstance(col, pa.ChunkedArray):
        return col
    if col.num_chunks == 1:
        return col.chunk(0)
    if pa.types.is_dictionary(col.type):
        return pc.cast(col, col.type.value_type).combine_chunks().dictionary_encode()
    return col.combine_chunks()


def _codes(values: Any, vocab: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Positions of ``values`` in ``vocab`` (int32, -1 = absent) and the distinct absent values, columnar."""
    arr = _one_array(values) if isinstance(values, (pa.Array, pa.ChunkedArray)) else \
        pa.array(np.asarray(values, dtype=object), pa.string())
    if pa.types.is_dictionary(arr.type):  # code the dictionary once, then gather by index
        dcodes, bad = _codes(arr.dictionary, vocab)
        idx = np.asarray(pc.fill_null(arr.indices, 0).to_numpy(zero_copy_only=False), dtype=np.int64)
        return (dcodes[idx] if dcodes.size else np.zeros(idx.size, np.int32)), bad
    arr = pc.cast(arr, pa.string())
    pos = pc.index_in(arr, value_set=pa.array(list(vocab), pa.string()))
    missing = pc.is_null(pos)
    bad = sorted(set(pc.filter(arr, missing).to_pylist())) if pc.any(missing).as_py() else []
    return np.asarray(pc.fill_null(pos, -1).to_numpy(zero_copy_only=False), dtype=np.int32), [str(b) for b in bad]


def _pattern_ids(fired: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group merchants by fired pattern: (unique patterns as bool rows, inverse index per merchant)."""
    n, R = fired.shape
    packed = np.packbits(fired, axis=1, bitorder="little")
    width = -(-max(packed.shape[1], 1) // 8) * 8
    buf = np.zeros((n, width), dtype=np.uint8)
    buf[:, : packed.shape[1]] = packed
    words = buf.view("<u8")
    if words.shape[1] == 1:
        uniq = np.unique(words[:, 0])  # few distinct patterns: unique + searchsorted beats return_inverse
        inv = np.searchsorted(uniq, words[:, 0])
        uwords = uniq.reshape(-1, 1)
    else:
        uwords, inv = np.unique(words, axis=0, return_inverse=True)
    ubits = np.unpackbits(np.ascontiguousarray(uwords).view(np.uint8), axis=1, bitorder="little")[:, :R].astype(bool)
    return ubits, inv.reshape(-1).astype(np.int64)


def build_candidate_set(ladder: RuleLadder, merchant_id: np.ndarray, home_iso: Sequence[str], channel: Sequence[str],
                        mcc: np.ndarray, iso_list: Sequence[str]) -> CandidateSet:
    """S3.0-S3.3 for all merchants at once (pure; no files).

    ``merchant_id`` uint64; ``home_iso`` ISO2 strings; ``channel`` 'CP'/'CNP'; ``mcc`` ints; ``iso_list`` the ISO
    table's codes. Raises ``ERR_S3_DUPLICATE_ROW`` (duplicate merchant), ``ERR_S3_COUNTRY_CODE_INVALID`` (home
    not in the ISO table), ``ERR_S3_VOCAB_INVALID`` (channel outside {CP, CNP}).
    """
    iso_list = tuple(sorted(set(iso_list)))  # A->Z: country_code order == ISO A->Z tie-break order
    iso_index = {c: i for i, c in enumerate(iso_list)}
    mid = np.asarray(merchant_id, dtype=np.uint64)
    n = mid.shape[0]
    order = np.argsort(mid, kind="stable")
    mid = mid[order]
    if n > 1 and np.any(mid[1:] == mid[:-1]):
        d = np.unique(mid[1:][mid[1:] == mid[:-1]])
        raise _err("ERR_S3_DUPLICATE_ROW", "duplicate merchant_id in the merchant table", rows=[int(x) for x in d[:10]])
    mcc = np.asarray(mcc, dtype=np.int64)[order]
    # vocabulary checks (S3.0), columnar
    home_code, bad = _codes(home_iso, iso_list)
    if bad:
        raise _err("ERR_S3_COUNTRY_CODE_INVALID", "home_country_iso not in the ISO table", rows=bad)
    home_code = home_code[order]
    channel_code, badc = _codes(channel, CHANNELS)
    if badc:
        raise _err("ERR_S3_VOCAB_INVALID", "channel outside {CP, CNP} (normalise at ingress, decision 28)", rows=badc)
    channel_code = channel_code[order].astype(np.int8)

    fired = evaluate_ladder(ladder, home_code, channel_code, mcc, iso_list)
    pats, pinv = _pattern_ids(fired)

    reasons = _ListRegistry()
    tags = _ListRegistry()
    P = pats.shape[0]
    pat_elig = np.zeros(P, dtype=bool)
    pat_home_reason = np.zeros(P, dtype=np.int32)
    pat_home_tag = np.zeros(P, dtype=np.int32)
    f_iso: list[int] = []
    f_reason: list[int] = []
    f_tag: list[int] = []
    f_len = np.zeros(P, dtype=np.int64)
    for p in range(P):  # one iteration per distinct fired pattern (a handful)
        fr = [j for j in range(len(ladder.rules)) if pats[p, j]]
        elig, _ = decide(ladder, pats[p])
        pat_elig[p] = elig
        merchant_tags = set().union(*(ladder.rules[j].tags for j in fr)) if fr else set()
        pat_home_reason[p] = reasons.id(ladder.rules[j].reason_code for j in fr)  # Decision: all fired codes
        pat_home_tag[p] = tags.id(merchant_tags | {"HOME"})
        if not elig:
            continue
        admit_rules: dict[str, list[int]] = {}
        denies: set[str] = set()
        for j in fr:
            for c in ladder.rules[j].admit:
                admit_rules.setdefault(c, []).append(j)
            denies.update(ladder.rules[j].deny)
        foreign = [c for c in admit_rules if c not in denies]
        # S3.3: Key1 = min <precedence_rank, priority, rule_id> over admitting rules == min index in the
        # ladder's total order (rules are sorted by exactly that key); ties by ISO A->Z.
        foreign.sort(key=lambda c: (min(admit_rules[c]), c))
        for c in foreign:
            js = admit_rules[c]
            f_iso.append(iso_index[c])
            f_reason.append(reasons.id(ladder.rules[j].reason_code for j in js))
            f_tag.append(tags.id(merchant_tags.union(*(ladder.rules[j].row_tags for j in js))))
        f_len[p] = len(foreign)
    f_iso_a = np.array(f_iso, dtype=np.int32)
    f_reason_a = np.array(f_reason, dtype=np.int32)
    f_tag_a = np.array(f_tag, dtype=np.int32)
    f_off = np.zeros(P + 1, dtype=np.int64)
    np.cumsum(f_len, out=f_off[1:])

    # expand pattern lists to merchants, dropping the merchant's own home country (S3.2 FOREIGN \ {home})
    L = f_len[pinv]
    total = int(L.sum())
    row_m = np.repeat(np.arange(n, dtype=np.int64), L)
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(L, out=starts[1:])
    pos = np.arange(total, dtype=np.int64) - starts[row_m]
    gidx = f_off[pinv[row_m]] + pos
    r_iso = f_iso_a[gidx]
    keep = r_iso != home_code[row_m]
    row_m, gidx, r_iso = row_m[keep], gidx[keep], r_iso[keep]
    A = np.bincount(row_m, minlength=n).astype(np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(A + 1, out=offsets[1:])
    nrows = int(offsets[-1])
    # rank of each kept foreign row within its merchant: 1..A in pattern order
    fstart = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(A, out=fstart[1:])
    frank = np.arange(row_m.shape[0], dtype=np.int64) - fstart[row_m] + 1
    dest = offsets[row_m] + frank

    country = np.empty(nrows, dtype=np.int32)
    rank = np.empty(nrows, dtype=np.int32)
    is_home = np.zeros(nrows, dtype=bool)
    ridx = np.empty(nrows, dtype=np.int32)
    tidx = np.empty(nrows, dtype=np.int32)
    hpos = offsets[:-1]
    country[hpos] = home_code
    rank[hpos] = 0
    is_home[hpos] = True
    ridx[hpos] = pat_home_reason[pinv]
    tidx[hpos] = pat_home_tag[pinv]
    country[dest] = r_iso
    rank[dest] = frank
    ridx[dest] = f_reason_a[gidx]
    tidx[dest] = f_tag_a[gidx]
    mids = np.repeat(mid, A + 1)
    return CandidateSet(mids, country, rank, is_home, ridx, tidx, iso_list, reasons.array(), tags.array(), mid, offsets,
                        pat_elig[pinv], A.astype(np.int32))


# --------------------------------------------------------------------------------------------------
# S3.4 priors
# --------------------------------------------------------------------------------------------------


def prior_value(policy: BaseWeightPolicy, is_home: bool, rank: int) -> tuple[float, str]:
    """One prior, exactly in the §3.3 S3.4 order with scalar binary64 + math (numeric profile §0)."""
    log_w = policy.beta0 + policy.beta_home * (1.0 if is_home else 0.0) + policy.beta_rank * float(rank)
    log_w = min(max(log_w, policy.log_w_min), policy.log_w_max)
    w = math.exp(log_w)
    w = min(max(w, policy.w_min), policy.w_max)
    q = round(w * float(10 ** policy.dp))  # Python round() on a float is half-even (RNE); exact int
    wq = q / (10 ** policy.dp)  # int / int true division is correctly rounded
    return wq, f"{wq:.{policy.dp}f}"


def base_weight_priors(policy: BaseWeightPolicy, is_home: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, pa.Array]:
    """Priors for every candidate row: (w⋄ float64, ``base_weight_dp`` strings as a pa.Array). The prior depends
    only on (is_home, candidate_rank), so the scalar formula runs once per distinct pair and is gathered."""
    key = np.asarray(rank, dtype=np.int64) * 2 + np.asarray(is_home, dtype=np.int64)
    if key.size and key.min() < 0:
        raise ModelError("ERR_S3_ORDERING_NONCONTIGUOUS", "negative candidate_rank")
    uk = np.flatnonzero(np.bincount(key)) if key.size else np.zeros(0, np.int64)  # ranks are small ints
    lut = np.zeros(int(uk[-1]) + 1 if uk.size else 1, dtype=np.int64)
    lut[uk] = np.arange(uk.size)
    inv = lut[key]
    vals = [prior_value(policy, bool(k & 1), int(k >> 1)) for k in uk.tolist()]
    w = np.array([v[0] for v in vals], dtype=np.float64)
    if uk.size and not np.all(w > 0.0):
        raise ModelError("ERR_S3_WEIGHT_ZERO", "a prior quantised to zero", path=policy.path)
    return w[inv], pa.array([v[1] for v in vals], pa.string()).take(pa.array(inv, pa.int64()))


# --------------------------------------------------------------------------------------------------
# S3.5 integerisation (numba kernel over merchant segments)
# --------------------------------------------------------------------------------------------------

STATUS_OK = 0
STATUS_INFEASIBLE = 1
STATUS_BAD_WEIGHTS = 2


@numba.njit(cache=True)
def _integerise_kernel(offsets, N, w, is_home, iso_code, rank, caps, enabled, home_min, force_foreign,
                       min_one, cap_mode_n_minus, counts, rrank, status):
    nm = offsets.shape[0] - 1
    for m in range(nm):
        s0 = offsets[m]
        s1 = offsets[m + 1]
        M = s1 - s0
        n = N[m]
        L = np.zeros(M, dtype=np.int64)
        U = np.zeros(M, dtype=np.int64)
        # bounds per row (S3.5): unbounded == L=0, U=N (identical to plain Hamilton)
        L_home = 0
        if enabled:
            for i in range(M):
                if is_home[s0 + i]:
                    L_home = min(home_min, n)
        for i in range(M):
            r = s0 + i
            if not enabled:
                L[i] = 0
                U[i] = n
            elif is_home[r]:
                L[i] = L_home
                U[i] = n - 1 if (force_foreign and M > 1 and n >= 2) else n
            else:
                L[i] = 1 if (min_one and n >= M and n >= 2) else 0
                U[i] = max(L[i], n - L_home) if cap_mode_n_minus else n
            if caps[r] < U[i]:
                U[i] = caps[r]  # runbook-era per-country caps intersected into U (Decision §3.3)
        sumL = 0
        sumU = 0
        ok = True
        for i in range(M):
            sumL += L[i]
            sumU += U[i]
            if L[i] > U[i]:
                ok = False
        if not ok or sumL > n or n > sumU:
            status[m] = 1
            for i in range(M):
                counts[s0 + i] = 0
                rrank[s0 + i] = 0
            continue
        nprime = n - sumL
        # shares over rows with cap > 0, Neumaier sum in candidate_rank order (numeric profile §4)
        s = 0.0
        c = 0.0
        for i in range(M):
            if U[i] - L[i] > 0:
                x = w[s0 + i]
                t = s + x
                if abs(s) >= abs(x):
                    c += (s - t) + x
                else:
                    c += (x - t) + s
                s = t
        W = s + c
        if not (W > 0.0) or not np.isfinite(W):
            if nprime > 0:
                status[m] = 2
                continue
        resid = np.zeros(M, dtype=np.float64)
        cnt = np.zeros(M, dtype=np.int64)
        sumf = 0
        for i in range(M):
            cnt[i] = L[i]
            capi = U[i] - L[i]
            if capi > 0 and nprime > 0:
                a = float(nprime) * (w[s0 + i] / W)
                f = int(math.floor(a))
                if f > capi:
                    f = capi
                cnt[i] += f
                sumf += f
                resid[i] = np.rint((a - f) * 1e8) / 1e8  # quantise to dp_resid = 8, half-even
        d = nprime - sumf
        # order S: rows with remaining capacity first, then residual desc, ISO A->Z, rank asc, index
        idx = np.arange(M)
        for a_ in range(1, M):  # insertion sort (M is small)
            j = a_
            while j > 0:
                p = idx[j - 1]
                q = idx[j]
                cp = cnt[p] < U[p]
                cq = cnt[q] < U[q]
                swap = False
                if cq and not cp:
                    swap = True
                elif cq == cp:
                    if resid[q] > resid[p]:
                        swap = True
                    elif resid[q] == resid[p]:
                        ip = iso_code[s0 + p]
                        iq = iso_code[s0 + q]
                        if iq < ip or (iq == ip and (rank[s0 + q] < rank[s0 + p] or (rank[s0 + q] == rank[s0 + p] and q < p))):
                            swap = True
                if swap:
                    idx[j - 1] = q
                    idx[j] = p
                    j -= 1
                else:
                    break
        for pos in range(M):
            rrank[s0 + idx[pos]] = pos + 1
        # bump the first d rows (in S) that still have capacity; if d exceeds the number of such rows
        # (only possible when caps bind below floor(a')), keep cycling through S (documented extension).
        while d > 0:
            for pos in range(M):
                i = idx[pos]
                if cnt[i] < U[i]:
                    cnt[i] += 1
                    d -= 1
                    if d == 0:
                        break
        for i in range(M):
            counts[s0 + i] = cnt[i]
        status[m] = 0


def integerise(offsets: np.ndarray, N: np.ndarray, weights: np.ndarray | None, is_home: np.ndarray,
               iso_code: np.ndarray, rank: np.ndarray, thresholds: ThresholdsPolicy = UNBOUNDED,
               caps: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """S3.5 largest remainder over merchant segments (rows of merchant i = ``offsets[i]:offsets[i+1]`` in
    candidate_rank order). ``weights`` = priors w⋄ (or None -> equal shares 1/M). ``iso_code`` must sort like
    ISO A->Z. Returns (count int64, residual_rank int32, status per merchant: 0 ok, 1 infeasible, 2 zero weight).
    """
    nrows = int(offsets[-1])
    w = np.ones(nrows, dtype=np.float64) if weights is None else np.ascontiguousarray(weights, dtype=np.float64)
    caps_a = np.full(nrows, np.iinfo(np.int64).max, dtype=np.int64) if caps is None else np.ascontiguousarray(caps, dtype=np.int64)
    counts = np.zeros(nrows, dtype=np.int64)
    rr = np.zeros(nrows, dtype=np.int32)
    status = np.zeros(offsets.shape[0] - 1, dtype=np.int8)
    t = thresholds
    _integerise_kernel(np.ascontiguousarray(offsets, dtype=np.int64), np.ascontiguousarray(N, dtype=np.int64), w,
                       np.ascontiguousarray(is_home, dtype=np.bool_), np.ascontiguousarray(iso_code, dtype=np.int32),
                       np.ascontiguousarray(rank, dtype=np.int32), caps_a, bool(t.enabled), int(t.home_min),
                       bool(t.force_foreign), bool(t.min_one_per_country), t.foreign_cap_mode == "n_minus_home_min",
                       counts, rr, status)
    return counts, rr, status


def check_integerisation(offsets: np.ndarray, N: np.ndarray, counts: np.ndarray) -> None:
    """Post-checks of S3.5: Σcount = N (ERR_S3_INTEGER_SUM_MISMATCH), count >= 0 (ERR_S3_INTEGER_NEGATIVE)."""
    if np.any(counts < 0):
        raise ModelError("ERR_S3_INTEGER_NEGATIVE", "negative integerised count")
    sums = np.add.reduceat(counts, offsets[:-1]) if counts.size else np.zeros(0, dtype=np.int64)
    bad = np.nonzero(sums != N)[0]
    if bad.size:
        raise ModelError("ERR_S3_INTEGER_SUM_MISMATCH", "integerised counts do not sum to N", rows=[int(b) for b in bad[:10]])


# --------------------------------------------------------------------------------------------------
# S3.6 sequencing
# --------------------------------------------------------------------------------------------------


def site_sequence(merchant_id: np.ndarray, country_code: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``site_order = 1..count`` per (merchant, country) with count > 0 (input row order kept).
    Returns (merchant_id, country_code, site_order int32). count > 999999 -> ERR_S3_SITE_SEQUENCE_OVERFLOW."""
    over = np.nonzero(counts > SITE_ID_MAX)[0]
    if over.size:
        raise ModelError("ERR_S3_SITE_SEQUENCE_OVERFLOW", f"a (merchant, country) count exceeds {SITE_ID_MAX} sites",
                         rows=[f"merchant {int(merchant_id[i])}: count {int(counts[i])}" for i in over[:10]])
    c = counts.astype(np.int64)
    total = int(c.sum())
    grp = np.repeat(np.arange(c.shape[0], dtype=np.int64), c)
    start = np.zeros(c.shape[0] + 1, dtype=np.int64)
    np.cumsum(c, out=start[1:])
    order = (np.arange(total, dtype=np.int64) - start[grp] + 1).astype(np.int32)
    return merchant_id[grp], country_code[grp], order


def site_id_strings(site_order: np.ndarray) -> pa.Array:
    """Zero-padded 6-digit ``site_id`` (§3.3 S3.6), built columnar."""
    return pc.utf8_lpad(pc.cast(pa.array(site_order, type=pa.int32()), pa.string()), 6, "0")


# --------------------------------------------------------------------------------------------------
# run entry points
# --------------------------------------------------------------------------------------------------


def _schema_path(ctx, dataset_id: str) -> Path:
    from engine.core import dictionary

    return dictionary.load("1A", ctx.config).schema_path(dataset_id)  # schema_ref from the dictionary


def _check_sorted(dataset_id: str, merchant_idx: np.ndarray, *keys: np.ndarray) -> None:
    """Rows must already be in the writer sort (merchant, then keys), strictly increasing (it is the PK)."""
    if merchant_idx.size < 2:
        return
    gt = np.zeros(merchant_idx.size - 1, dtype=bool)  # row i+1 > row i, lexicographically
    eq = np.ones(merchant_idx.size - 1, dtype=bool)
    for k in (merchant_idx, *keys):
        a, b = k[:-1], k[1:]
        gt |= eq & (b > a)
        eq &= b == a
    if not gt.all():
        raise ModelError("ERR_S3_ORDER_MISMATCH", f"{dataset_id}: rows are not in writer order",
                         rows=np.flatnonzero(~gt)[:10].tolist())


def _publish(ctx, dataset_id: str, table: pa.Table) -> Path:
    """Write one S3 partition atomically with its ``_manifest.json`` sidecar (§0.1).

    ``table`` is already in the dictionary's writer sort (checked by the caller with integer keys, so the
    writer does not re-sort millions of rows). Its columns are cast to the dataset schema by the writer; the
    value-level schema check runs on a bounded head of the table (the columns are built by construction)."""
    from engine.core import publish
    from engine.core.schema import arrow_schema, validate_table

    schema_path = _schema_path(ctx, dataset_id)
    problems = validate_table(table.slice(0, 4096), schema_path)
    if problems:
        raise ModelError("ERR_S3_EGRESS_SHAPE", f"{dataset_id} does not match its schema", path=schema_path, rows=problems)
    final = ctx.path(dataset_id)
    code = "E_IMMUTABLE_PARTITION_EXISTS_NONIDENTICAL"
    with publish.staged(final, code) as tmp:
        part = Path(tmp) / "part-00000.parquet"
        publish.write_parquet(table, part, sort_by=None, schema=arrow_schema(schema_path))
        data = part.read_bytes()
        publish.write_json({
            "manifest_fingerprint": ctx.ids.manifest_fingerprint,
            "parameter_hash": ctx.ids.parameter_hash,
            "row_count": table.num_rows,
            "files_sorted": ["part-00000.parquet"],
            "dataset_digest": hashlib.sha256(data).hexdigest(),
        }, Path(tmp) / "_manifest.json")
    return final


def _options(ctx) -> dict:
    return dict(ctx.config["segment1a"].get("options") or {})


def _params(ctx) -> dict:
    return dict(ctx.config["segment1a"]["parameters"])


def _iso_list(ctx) -> list[str]:
    from engine.segment1a import inputs

    return [str(c) for c in inputs.iso_codes(inputs.load_iso_table(ctx.config["segment1a"]["inputs"]["iso_table"]))]


def _mcc_vocab(ctx) -> np.ndarray | None:
    """The MCC vocabulary = the hurdle coefficients' ``dict_mcc`` (every merchant MCC is in it, 00-core 7.3)."""
    from engine.segment1a import inputs

    p = _params(ctx).get("hurdle_coefficients.yaml")
    return None if p is None else np.asarray(inputs.load_hurdle_coefficients(p).dict_mcc)


def _load_universe(ctx):
    """The S0-accepted merchants (``hurdle_design_matrix``: merchant_id, mcc, channel CP/CNP, home ISO),
    the ISO list and the MCC vocabulary, through the shared loaders (inputs.py)."""
    from engine.segment1a import inputs

    dm = inputs.read_design_matrix(ctx)
    merchants = {
        "merchant_id": np.asarray(dm["merchant_id"].to_numpy(zero_copy_only=False), dtype=np.uint64),
        "mcc": np.asarray(dm["mcc"].to_numpy(zero_copy_only=False), dtype=np.int64),
        "channel": dm["channel"],  # string columns stay Arrow (coded columnar in build_candidate_set)
        "home_country_iso": dm["home_country_iso"],
    }
    return merchants, _iso_list(ctx), _mcc_vocab(ctx)


def load_policies(ctx, iso_list: Sequence[str], mcc_vocab: Iterable[int] | None):
    """All S3 policies of this run, validated: (ladder, base_weight|None, thresholds, bounds|None)."""
    params = _params(ctx)
    opts = _options(ctx)
    if "policy.s3.rule_ladder.yaml" not in params:
        raise _err("ERR_S3_AUTHORITY_MISSING", "parameter policy.s3.rule_ladder.yaml is required by S3")
    ladder = load_rule_ladder(params["policy.s3.rule_ladder.yaml"], iso_list, mcc_vocab)
    bw = None
    if opts.get("s3_priors"):
        if "policy.s3.base_weight.yaml" not in params:
            raise _err("ERR_S3_WEIGHT_CONFIG", "--s3-priors needs the parameter policy.s3.base_weight.yaml")
        bw = load_base_weight(params["policy.s3.base_weight.yaml"])
    th = load_thresholds(params["policy.s3.thresholds.yaml"]) if "policy.s3.thresholds.yaml" in params else UNBOUNDED
    bounds = load_bounds(params["policy.s3.bounds.yaml"], iso_list) if "policy.s3.bounds.yaml" in params else None
    if opts.get("s3_sequencing") and not opts.get("s3_integerisation"):
        raise _err("ERR_S3_PRECONDITION", "--s3-sequencing requires --s3-integerisation (§3.5)")
    return ladder, bw, th, bounds


def run_candidates(ctx) -> None:
    """Parameter-scoped part of S3: ``s3_candidate_set`` (+ ``s3_base_weight_priors`` when enabled)."""
    merchants, iso_list, mcc_vocab = _load_universe(ctx)
    ladder, bw, _, _ = load_policies(ctx, iso_list, mcc_vocab)
    cs = build_candidate_set(ladder, merchants["merchant_id"], merchants["home_country_iso"], merchants["channel"],
                             merchants["mcc"], iso_list)
    ph, fp = ctx.ids.parameter_hash, ctx.ids.manifest_fingerprint
    midx = np.repeat(np.arange(cs.merchants.size, dtype=np.int64), np.diff(cs.offsets))
    _check_sorted("s3_candidate_set", midx, cs.candidate_rank)
    if bw is not None:  # everything that can fail is computed before the first publish
        w, s = base_weight_priors(bw, cs.is_home, cs.candidate_rank)
        perm = np.lexsort((cs.country_code, midx))  # writer sort (merchant_id, country_iso); codes sort as ISO A->Z
        _check_sorted("s3_base_weight_priors", midx[perm], cs.country_code[perm])
    table = cs.table(ph, fp)
    _publish(ctx, "s3_candidate_set", table)
    del table  # tables are materialised one at a time (memory at 10^6 merchants)
    if bw is not None:
        n = cs.merchant_id.shape[0]
        _publish(ctx, "s3_base_weight_priors", pa.table({
            "merchant_id": pa.array(cs.merchant_id[perm], type=pa.uint64()),
            "country_iso": cs.country_iso().take(pa.array(perm)),
            "base_weight_dp": s.take(pa.array(perm)),
            "dp": pa.array(np.full(n, bw.dp, dtype=np.int32), type=pa.int32()),
            "parameter_hash": _const(ph, n),
            "produced_by_fingerprint": _const(fp, n),
        }))


def read_partition_columns(ctx, dataset_id: str, columns: Sequence[str], code_missing: str) -> pa.Table:
    """Selected columns of a published parameter-scoped partition (``part-*.parquet`` in name order), with
    path<->embed equality of ``parameter_hash`` (§0 read discipline). String columns come back dictionary-encoded
    (cheap for constant / low-cardinality columns)."""
    import pyarrow.parquet as pq

    d = Path(ctx.path(dataset_id))
    parts = sorted(p for p in d.glob("part-*.parquet")) if d.is_dir() else []
    if not parts:
        raise InputError(code_missing, f"{dataset_id} is not published for this run", path=d)
    cols = list(dict.fromkeys(list(columns) + ["parameter_hash"]))
    tables = []
    for p in parts:
        names = pq.ParquetFile(p).schema_arrow.names
        dict_cols = [c for c in cols if c in names and c not in ("merchant_id",)]
        tables.append(pq.read_table(p, columns=[c for c in cols if c in names], read_dictionary=dict_cols))
    t = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if "parameter_hash" in t.column_names and t.num_rows:
        col = _one_array(t["parameter_hash"])
        if pa.types.is_dictionary(col.type):  # distinct values without materialising the column
            used = np.unique(np.asarray(pc.fill_null(col.indices, 0).to_numpy(zero_copy_only=False)))
            ph = sorted(set(col.dictionary.take(pa.array(used)).to_pylist()) | ({None} if col.null_count else set()))
        else:
            ph = pc.unique(col).to_pylist()
        if ph != [ctx.ids.parameter_hash]:
            raise InputError("ERR_S3_PARTITION_MISMATCH", f"{dataset_id} embeds a parameter_hash different from its path",
                             path=d, rows=[str(x) for x in ph[:10]])
    missing = [c for c in columns if c not in t.column_names]
    if missing:
        raise InputError(code_missing, f"{dataset_id} lacks columns {missing}", path=d)
    return t.select(list(columns)).combine_chunks()


def read_candidate_set(ctx, columns: Sequence[str] = ("merchant_id", "country_iso", "candidate_rank", "is_home"),
                       code_missing: str = "ERR_S3_AUTHORITY_MISSING") -> pa.Table:
    """``s3_candidate_set`` of this run (selected columns), checked to be in (merchant_id, candidate_rank) order."""
    cols = list(dict.fromkeys(list(columns) + ["merchant_id", "candidate_rank"]))
    t = read_partition_columns(ctx, "s3_candidate_set", cols, code_missing)
    mid = np.asarray(t["merchant_id"].to_numpy(zero_copy_only=False), dtype=np.uint64)
    rank = np.asarray(t["candidate_rank"].to_numpy(zero_copy_only=False), dtype=np.int64)
    if mid.size > 1:
        ok = (mid[1:] > mid[:-1]) | ((mid[1:] == mid[:-1]) & (rank[1:] == rank[:-1] + 1))
        if not ok.all() or (mid.size and rank[0] != 0):
            raise InputError("ERR_S3_ORDER_MISMATCH", "s3_candidate_set is not in (merchant_id, candidate_rank) order "
                             "with contiguous ranks", path=ctx.path("s3_candidate_set"))
    return t.select(list(columns))


def n_outlets_by_merchant(ctx) -> tuple[np.ndarray, np.ndarray]:
    """(merchant_id uint64 sorted, N int64) from the S2 ``nb_final`` events of this run."""
    from engine.core import rnglog

    t = rnglog.read_events(ctx.data_root, ctx.ids, "nb_final", columns=["merchant_id", "n_outlets"], config=ctx.config)
    mid = np.asarray(t["merchant_id"].to_numpy(zero_copy_only=False), dtype=np.uint64)
    n = np.asarray(t["n_outlets"].to_numpy(zero_copy_only=False), dtype=np.int64)
    o = np.argsort(mid, kind="stable")
    mid, n = mid[o], n[o]
    if mid.size > 1 and np.any(mid[1:] == mid[:-1]):
        raise InputError("ERR_S3_PRECONDITION", "more than one nb_final per merchant",
                         rows=[int(x) for x in np.unique(mid[1:][mid[1:] == mid[:-1]])[:10]])
    if np.any(n < 2):
        raise InputError("ERR_S3_PRECONDITION", "nb_final with N < 2", rows=[int(x) for x in mid[n < 2][:10]])
    return mid, n


def compute_lanes(cand: pa.Table, n_mid: np.ndarray, n_val: np.ndarray, iso_list: Sequence[str],
                  priors: np.ndarray | None, thresholds: ThresholdsPolicy, bounds: BoundsPolicy | None,
                  sequencing: bool) -> dict:
    """Pure part of :func:`run_lanes`. ``cand`` sorted by (merchant_id, candidate_rank); ``priors`` aligned with
    ``cand`` rows (or None). Only merchants with an ``nb_final`` are integerised. Returns numpy columns."""
    iso_sorted = tuple(sorted(set(iso_list)))
    mid_all = np.asarray(cand["merchant_id"].to_numpy(zero_copy_only=False), dtype=np.uint64)
    if mid_all.size > 1 and np.any(mid_all[1:] < mid_all[:-1]):
        raise InputError("ERR_S3_ORDER_MISMATCH", "candidate rows must be sorted by merchant_id")
    sel = np.isin(mid_all, n_mid)
    mid = mid_all[sel]
    pos = np.minimum(np.searchsorted(mid_all, n_mid), max(mid_all.size - 1, 0))
    missing = n_mid[(mid_all[pos] != n_mid)] if mid_all.size else n_mid
    if missing.size:
        raise InputError("ERR_S3_AUTHORITY_MISSING", "multi-site merchants without candidate rows",
                         rows=[int(x) for x in missing[:10]])
    code_all, bad = _codes(cand["country_iso"], iso_sorted)
    if bad:
        raise InputError("ERR_S3_COUNTRY_CODE_INVALID", "s3_candidate_set country_iso not in the ISO table", rows=bad)
    code = code_all[sel]
    rank = np.asarray(cand["candidate_rank"].to_numpy(zero_copy_only=False), dtype=np.int32)[sel]
    home = np.asarray(cand["is_home"].to_numpy(zero_copy_only=False), dtype=bool)[sel]
    w = None if priors is None else np.asarray(priors, dtype=np.float64)[sel]
    starts = np.flatnonzero(np.r_[True, mid[1:] != mid[:-1]]) if mid.size else np.zeros(0, np.int64)
    um = mid[starts]
    offsets = np.append(starts, mid.size).astype(np.int64)
    N = n_val[np.searchsorted(n_mid, um)]
    caps = None if bounds is None else bounds.caps_for(iso_sorted)[code]
    counts, rr, status = integerise(offsets, N, w, home, code, rank, thresholds, caps)
    bad = np.nonzero(status != 0)[0]
    if bad.size:
        st = int(status[bad[0]])
        raise ModelError("ERR_S3_INTEGER_FEASIBILITY" if st == 1 else "ERR_S3_WEIGHT_ZERO",
                         "integerisation bounds are infeasible (sum L <= N <= sum U fails)" if st == 1 else "zero prior mass",
                         rows=[f"merchant {int(um[b])} N={int(N[b])}" for b in bad[:10]])
    check_integerisation(offsets, N, counts)
    # writer sort (merchant_id, country_iso): integer keys (codes sort as ISO A->Z), one permutation
    midx = np.repeat(np.arange(um.size, dtype=np.int64), np.diff(offsets))
    perm = np.lexsort((code, midx))
    _check_sorted("s3_integerised_counts", midx[perm], code[perm])
    out = {"merchant_id": mid[perm], "country_code": code[perm], "count": counts[perm], "residual_rank": rr[perm],
           "iso_list": iso_sorted}
    if sequencing:  # generated from the sorted counts: already in (merchant_id, country_iso, site_order) order
        out["seq"] = site_sequence(out["merchant_id"], out["country_code"], out["count"])
    return out


def run_lanes(ctx) -> None:
    """Seed-scoped lanes of S3 (need N): ``s3_integerised_counts`` and ``s3_site_sequence`` when enabled."""
    opts = _options(ctx)
    if not opts.get("s3_integerisation") and not opts.get("s3_sequencing"):
        return
    iso_list = _iso_list(ctx)
    _, bw, th, bounds = load_policies(ctx, iso_list, _mcc_vocab(ctx))
    cand = read_candidate_set(ctx)
    priors = None
    if bw is not None:
        # w⋄ is a pure function of (is_home, candidate_rank) and the sealed base-weight policy, whose bytes are in
        # this run's parameter_hash (the path token of s3_base_weight_priors): recomputing it here gives exactly
        # the published values (test: published strings parse back to these floats) without a 2-table join.
        priors, _ = base_weight_priors(bw, np.asarray(cand["is_home"].to_numpy(zero_copy_only=False), dtype=bool),
                                       np.asarray(cand["candidate_rank"].to_numpy(zero_copy_only=False), dtype=np.int64))
    n_mid, n_val = n_outlets_by_merchant(ctx)
    res = compute_lanes(cand, n_mid, n_val, iso_list, priors, th, bounds, bool(opts.get("s3_sequencing")))
    ph, fp = ctx.ids.parameter_hash, ctx.ids.manifest_fingerprint
    iso_arr = pa.array(list(res["iso_list"]), pa.string())
    tables = {}
    if opts.get("s3_integerisation"):
        n = res["merchant_id"].shape[0]
        tables["s3_integerised_counts"] = pa.table({
            "merchant_id": pa.array(res["merchant_id"], type=pa.uint64()),
            "country_iso": iso_arr.take(pa.array(res["country_code"], pa.int32())),
            "count": pa.array(res["count"].astype(np.int32), type=pa.int32()),
            "residual_rank": pa.array(res["residual_rank"], type=pa.int32()),
            "parameter_hash": _const(ph, n),
            "produced_by_fingerprint": _const(fp, n),
        })
    if opts.get("s3_sequencing"):
        smid, scode, sorder = res["seq"]
        n = smid.shape[0]
        tables["s3_site_sequence"] = pa.table({
            "merchant_id": pa.array(smid, type=pa.uint64()),
            "country_iso": iso_arr.take(pa.array(scode, pa.int32())),
            "site_order": pa.array(sorder, type=pa.int32()),
            "site_id": site_id_strings(sorder),
            "parameter_hash": _const(ph, n),
            "produced_by_fingerprint": _const(fp, n),
        })
    for ds in ("s3_integerised_counts", "s3_site_sequence"):
        if ds in tables:
            _publish(ctx, ds, tables[ds])


def run(ctx) -> None:
    """Both parts (for callers that want the whole state in one call)."""
    run_candidates(ctx)
    run_lanes(ctx)
