"""Dataset dictionaries (decision 26), token validation, path<->embed checks and row schemas."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from engine.core import dictionary as D
from engine.core import schema as S
from engine.core.context import RunContext, SegmentIds
from engine.core.errors import EngineError

PH = "a" * 64
FP = "b" * 64
RUN = "c" * 32
GRID = "d" * 64
WEIGHTS = "e" * 64
TOKENS = dict(seed=9248923, parameter_hash=PH, manifest_fingerprint=FP, run_id=RUN, family="gumbel_key",
              grid_hash=GRID, weights_hash=WEIGHTS)

IDS_1A = ["sealed_inputs_1A", "s0_gate_receipt_1A", "hurdle_design_matrix", "hurdle_pi_probs",
          "crossborder_eligibility_flags", "crossborder_features", "merchant_abort_log", "s3_candidate_set",
          "s3_base_weight_priors", "s3_integerised_counts", "s3_site_sequence", "ccy_country_weights_cache",
          "merchant_currency", "sparse_flag", "s6_membership", "s6_receipt", "s7_integer_allocation",
          "outlet_catalogue", "validation_bundle_1A", "validation_failures_1A", "run_config_1A", "s4_metrics_log", "rng_event",
          "rng_trace_log", "rng_audit_log"]
IDS_1B = ["s0_gate_receipt_1B", "sealed_inputs_1B", "tile_index", "tile_bounds", "tile_weights", "s3_requirements",
          "s4_alloc_plan", "s5_site_tile_assignment", "s6_site_jitter", "s7_site_synthesis", "site_locations",
          "validation_bundle_1B", "s9_stage_log", "run_record_1B", "rng_event", "rng_trace_log", "rng_audit_log"]

S_ = "seed=9248923"
P_ = f"parameter_hash={PH}"
F_ = f"fingerprint={FP}"
R_ = f"run_id={RUN}"
EXPECTED = {
    ("1A", "outlet_catalogue"): f"data/layer1/1A/outlet_catalogue/{S_}/{F_}",
    ("1A", "validation_bundle_1A"): f"data/layer1/1A/validation/{S_}/{F_}",
    ("1A", "s0_gate_receipt_1A"): f"data/layer1/1A/s0_gate_receipt/{F_}",
    ("1A", "sealed_inputs_1A"): f"data/layer1/1A/sealed_inputs/{F_}",
    ("1A", "hurdle_design_matrix"): f"data/layer1/1A/hurdle_design_matrix/{P_}/{F_}",
    ("1A", "hurdle_pi_probs"): f"data/layer1/1A/hurdle_pi_probs/{P_}/{F_}",
    ("1A", "crossborder_eligibility_flags"): f"data/layer1/1A/crossborder_eligibility_flags/{P_}/{F_}",
    ("1A", "crossborder_features"): f"data/layer1/1A/crossborder_features/{P_}/{F_}",
    ("1A", "ccy_country_weights_cache"): f"data/layer1/1A/ccy_country_weights_cache/{P_}",
    ("1A", "sparse_flag"): f"data/layer1/1A/sparse_flag/{P_}",
    ("1A", "merchant_currency"): f"data/layer1/1A/merchant_currency/{P_}/{F_}",
    ("1A", "s3_candidate_set"): f"data/layer1/1A/s3_candidate_set/{P_}/{F_}",
    ("1A", "s3_base_weight_priors"): f"data/layer1/1A/s3_base_weight_priors/{P_}/{F_}",
    ("1A", "s3_integerised_counts"): f"data/layer1/1A/s3_integerised_counts/{S_}/{P_}/{F_}",
    ("1A", "s3_site_sequence"): f"data/layer1/1A/s3_site_sequence/{S_}/{P_}/{F_}",
    ("1A", "s6_membership"): f"data/layer1/1A/s6/membership/{S_}/{P_}/{F_}",
    ("1A", "s6_receipt"): f"data/layer1/1A/s6/receipt/{S_}/{P_}/{F_}",
    ("1A", "s7_integer_allocation"): f"data/layer1/1A/s7_integer_allocation/{S_}/{P_}/{F_}",
    ("1A", "validation_failures_1A"): f"data/layer1/1A/validation/failures/{S_}/{F_}/{R_}",
    ("1A", "s4_metrics_log"): f"logs/metrics/s4/{S_}/{P_}/{R_}/s4_metrics.jsonl",
    ("1A", "rng_event"): f"logs/rng/events/gumbel_key/{S_}/{P_}/{R_}",
    ("1A", "rng_trace_log"): f"logs/rng/trace/{S_}/{P_}/{R_}/rng_trace_log.jsonl",
    ("1A", "rng_audit_log"): f"logs/rng/audit/{S_}/{P_}/{R_}/rng_audit_log.jsonl",
    ("1B", "tile_index"): f"data/layer1/1B/tile_index/grid={GRID}",
    ("1B", "tile_bounds"): f"data/layer1/1B/tile_bounds/grid={GRID}",
    ("1B", "tile_weights"): f"data/layer1/1B/tile_weights/grid={GRID}/weights={WEIGHTS}",
    ("1B", "s0_gate_receipt_1B"): f"data/layer1/1B/s0_gate_receipt/{S_}/{F_}",
    ("1B", "sealed_inputs_1B"): f"data/layer1/1B/sealed_inputs/{S_}/{F_}",
    ("1B", "s5_site_tile_assignment"): f"data/layer1/1B/s5_site_tile_assignment/{S_}/{P_}/{F_}",
    ("1B", "site_locations"): f"data/layer1/1B/site_locations/{S_}/{F_}",
    ("1B", "validation_bundle_1B"): f"data/layer1/1B/validation/{S_}/{F_}",
    ("1B", "s9_stage_log"): "logs/stages/s9_validation/segment_1B/S9_STAGES.jsonl",
    ("1B", "rng_trace_log"): f"logs/rng/trace/{S_}/{P_}/{R_}/rng_trace_log.jsonl",
}


# ---------------------------------------------------------------------- contents
@pytest.mark.parametrize("segment,ids", [("1A", IDS_1A), ("1B", IDS_1B)])
def test_dictionary_has_exactly_the_fixed_ids(segment, ids):
    assert sorted(D.load(segment).ids()) == sorted(ids)


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_templates_render_to_the_decided_paths(key):
    segment, ds = key
    assert D.load(segment).path(ds, **TOKENS) == EXPECTED[key]


def test_rng_logs_are_written_once_and_shared_by_1b():
    a, b = D.load("1A"), D.load("1B")
    raw_1b = yaml.safe_load((D.CONTRACTS_DIR / "dataset_dictionary.layer1.1B.yaml").read_text())
    assert raw_1b["inherits"] == "dataset_dictionary.layer1.1A.yaml#shared"
    assert "rng_event" not in (raw_1b.get("datasets") or {})
    for ds in ("rng_event", "rng_trace_log", "rng_audit_log"):
        assert a.entry(ds) == b.entry(ds)
        assert a.entry(ds).shared
    assert a.families() == b.families()


def test_no_template_uses_manifest_fingerprint_dirs_and_token_order_holds():
    order = ["seed", "parameter_hash", "fingerprint", "run_id"]
    for seg in ("1A", "1B"):
        d = D.load(seg)
        for ds in d.ids():
            tpl = d.template(ds)
            assert "manifest_fingerprint=" not in tpl, ds
            dirs = [p.split("=")[0] for p in tpl.split("/") if "=" in p]
            ranked = [order.index(x) for x in dirs if x in order]
            assert ranked == sorted(ranked), (ds, tpl)
            assert D.parse_tokens(d.path(ds, **TOKENS)).keys() - {"family"} == set(d.entry(ds).partitioning)


def test_every_entry_has_the_required_fields():
    for seg in ("1A", "1B"):
        d = D.load(seg)
        for ds in d.ids():
            e = d.entry(ds)
            assert e.format in D.FORMATS
            assert e.schema_ref and e.schema_ref.startswith("schemas/")
            assert e.produced_by and e.description
            assert isinstance(e.writer_sort, tuple) and isinstance(e.files, tuple)
    d = D.load("1A")
    assert d.entry("outlet_catalogue").writer_sort == ("merchant_id", "legal_country_iso", "site_order")
    assert d.entry("s0_gate_receipt_1A").files == ("s0_gate_receipt.json",)
    assert d.file("s0_gate_receipt_1A", **TOKENS).endswith(f"{F_}/s0_gate_receipt.json")
    assert d.file("rng_trace_log", **TOKENS) == EXPECTED[("1A", "rng_trace_log")]
    assert d.file("validation_bundle_1A", "_passed.flag", **TOKENS).endswith(f"{S_}/{F_}/_passed.flag")


def test_rng_family_table_matches_the_frozen_literals():
    fams = D.families()
    expect = {
        "hurdle_bernoulli": [("1A.hurdle_sampler", "hurdle_bernoulli")],
        "gamma_component": [("1A.nb_and_dirichlet_sampler", "gamma_nb")],
        "poisson_component": [("1A.nb_poisson_component", "poisson_nb"), ("1A.ztp_sampler", "poisson_component")],
        "nb_final": [("1A.nb_sampler", "nb_final")],
        "ztp_final": [("1A.ztp_sampler", "poisson_component")],
        "gumbel_key": [("1A.foreign_country_selector", "gumbel_key")],
        "residual_rank": [("1A.integerisation", "residual_rank")],
        "sequence_finalize": [("1A.site_id_allocator", "sequence_finalize")],
        "anchor": [("1A.s0", "s0.anchor")],
        "site_tile_assign": [("1B.S5.assigner", "site_tile_assign")],
        "in_cell_jitter": [("1B.S6.jitter", "in_cell_jitter")],
    }
    for fam, pairs in expect.items():
        assert [(s["module"], s["substream_label"]) for s in fams[fam]["streams"]] == pairs, fam
    assert fams["gumbel_key"]["budget"] == {"blocks": 1, "draws": "1"}
    assert fams["in_cell_jitter"]["budget"] == {"blocks": 1, "draws": "2"}
    assert fams["site_tile_assign"]["budget"] == {"blocks": 1, "draws": "1"}
    assert fams["hurdle_bernoulli"]["budget"] == {"blocks": [0, 1], "draws_equals_blocks": True}
    for fam in ("anchor", "nb_final", "ztp_rejection", "ztp_retry_exhausted", "ztp_final", "residual_rank",
                "sequence_finalize", "site_sequence_overflow", "stream_jump"):
        assert fams[fam]["consuming"] is False and fams[fam]["budget"] == {"blocks": 0, "draws": "0"}, fam
    for fam, spec in fams.items():
        assert (D.CONTRACTS_DIR / spec["schema_ref"]).is_file(), fam
        assert D.load("1A").schema_path("rng_event", family=fam) == D.CONTRACTS_DIR / spec["schema_ref"]


def test_family_schemas_repeat_the_envelope_exactly():
    env = S.load_schema("schemas/rng/rng_envelope.schema.json")["properties"]
    for fam, spec in D.families().items():
        sch = S.load_schema(spec["schema_ref"])
        assert sch["additionalProperties"] is False
        for k, v in env.items():
            got = {kk: vv for kk, vv in sch["properties"][k].items() if kk not in ("enum", "const")}
            assert got == v, (fam, k)
        assert set(env) <= set(sch["required"])
        if spec["streams"]:
            assert sch["properties"]["module"]["enum"] == sorted({s["module"] for s in spec["streams"]})


# ---------------------------------------------------------------------- token validation
@pytest.mark.parametrize("bad", [
    dict(seed=-1), dict(seed=2 ** 64), dict(seed="12a"), dict(seed=True), dict(seed=1.5), dict(seed="007"),
    dict(manifest_fingerprint="B" * 64), dict(manifest_fingerprint="b" * 63), dict(parameter_hash=None),
    dict(run_id="c" * 64), dict(run_id="c" * 32 + "\n"), dict(seed="12\n"),
])
def test_malformed_tokens_are_refused(bad):
    toks = {**TOKENS, **bad}
    ds = "s7_integer_allocation" if "run_id" not in bad else "validation_failures_1A"
    with pytest.raises(EngineError) as ei:
        D.load("1A").path(ds, **toks)
    assert ei.value.code == "E_DICTIONARY_RESOLUTION_FAILED"


def test_missing_token_unknown_id_and_unknown_family():
    d = D.load("1A")
    with pytest.raises(EngineError, match="E_DICTIONARY_RESOLUTION_FAILED"):
        d.path("outlet_catalogue", seed=1)
    with pytest.raises(EngineError, match="E_DICTIONARY_RESOLUTION_FAILED"):
        d.path("no_such_dataset", **TOKENS)
    with pytest.raises(EngineError, match="E_DICTIONARY_RESOLUTION_FAILED"):
        d.path("rng_event", **{**TOKENS, "family": "not_a_family"})


def test_u64_seed_edges_and_extra_tokens():
    d = D.load("1A")
    assert d.path("outlet_catalogue", seed=2 ** 64 - 1, manifest_fingerprint=FP).split("/")[4] == \
        "seed=18446744073709551615"
    assert d.path("outlet_catalogue", seed=np.uint64(2 ** 64 - 1), manifest_fingerprint=FP) == \
        d.path("outlet_catalogue", seed="18446744073709551615", manifest_fingerprint=FP, run_id="ignored")
    assert "seed=0/" in d.path("outlet_catalogue", seed=0, manifest_fingerprint=FP)


def test_wildcard_templates_for_snakemake():
    d = D.load("1A")
    assert d.wildcard_template("outlet_catalogue") == \
        "data/layer1/1A/outlet_catalogue/seed={seed}/fingerprint={manifest_fingerprint}"
    assert D.wildcard_template("rng_event", family="nb_final") == \
        "logs/rng/events/nb_final/seed={seed}/parameter_hash={parameter_hash}/run_id={run_id}"
    assert D.wildcard_template("tile_index") == "data/layer1/1B/tile_index/grid={grid_hash}"
    c = d.wildcard_template("outlet_catalogue", constrained=True)
    assert c == "data/layer1/1A/outlet_catalogue/seed={seed,[0-9]+}/fingerprint={manifest_fingerprint,[a-f0-9]{64}}"


# ---------------------------------------------------------------------- overrides and lint
def test_1b_dictionary_override_moves_outputs(tmp_path):
    raw = (D.CONTRACTS_DIR / "dataset_dictionary.layer1.1B.yaml").read_text()
    moved = raw.replace("data/layer1/1B/site_locations/seed={seed}", "data/moved/site_locations/seed={seed}")
    assert moved != raw
    alt = tmp_path / "elsewhere" / "my_1b.yaml"
    alt.parent.mkdir()
    alt.write_text(moved)  # no 1A file next to it: inherits falls back to contracts/
    cfg = {"segment1b": {"dictionary": str(alt)}}
    d = D.load("1B", cfg)
    assert d.path("site_locations", **TOKENS) == f"data/moved/site_locations/{S_}/{F_}"
    assert D.load("1B").path("site_locations", **TOKENS) == EXPECTED[("1B", "site_locations")]
    assert d.path("rng_trace_log", **TOKENS) == EXPECTED[("1B", "rng_trace_log")]
    # RunContext resolves through the same override
    ids = SegmentIds("1B", 9248923, PH, FP, RUN)
    ctx = RunContext(data_root=tmp_path, repo_root=D.REPO_ROOT, config=cfg, ids=ids)
    assert ctx.path("site_locations") == tmp_path / f"data/moved/site_locations/{S_}/{F_}"


def test_lint_rejects_manifest_fingerprint_directory(tmp_path):
    raw = (D.CONTRACTS_DIR / "dataset_dictionary.layer1.1A.yaml").read_text()
    bad = raw.replace("outlet_catalogue/seed={seed}/fingerprint=", "outlet_catalogue/seed={seed}/manifest_fingerprint=")
    p = tmp_path / "bad.yaml"
    p.write_text(bad)
    with pytest.raises(EngineError) as ei:
        D.load("1A", {"segment1a": {"dictionary": str(p)}})
    assert ei.value.code == "E_DICTIONARY_RESOLUTION_FAILED"
    assert any("outlet_catalogue" in x for x in ei.value.detail["problems"])
    swapped = raw.replace("s3_site_sequence/seed={seed}/parameter_hash={parameter_hash}",
                          "s3_site_sequence/parameter_hash={parameter_hash}/seed={seed}")
    p.write_text(swapped)
    with pytest.raises(EngineError, match="E_DICTIONARY_RESOLUTION_FAILED"):
        D.load("1A", {"segment1a": {"dictionary": str(p)}})


def test_run_context_resolves_1a_paths_for_1b(tmp_path):
    ids_1a = SegmentIds("1A", 7, PH, FP, RUN)
    ids_1b = SegmentIds("1B", 7, "1" * 64, "2" * 64, "3" * 32)
    ctx = RunContext(data_root=tmp_path, repo_root=D.REPO_ROOT, config={}, ids=ids_1b, ids_1a=ids_1a)
    assert ctx.path("outlet_catalogue", segment="1A") == tmp_path / f"data/layer1/1A/outlet_catalogue/seed=7/{F_}"
    assert ctx.path("site_locations") == tmp_path / f"data/layer1/1B/site_locations/seed=7/fingerprint={'2' * 64}"


# ---------------------------------------------------------------------- path <-> embed
def test_parse_tokens_and_check_embed():
    path = D.load("1A").path("outlet_catalogue", **TOKENS) + "/part-00000.parquet"
    assert D.parse_tokens(path) == {"seed": "9248923", "manifest_fingerprint": FP}
    good = pa.table({"manifest_fingerprint": [FP] * 3, "global_seed": pa.array([9248923] * 3, pa.uint64())})
    mapping = {"manifest_fingerprint": "manifest_fingerprint", "seed": "global_seed"}
    assert D.check_embed(path, good, mapping) == []
    bad = good.set_column(1, "global_seed", pa.array([9248923, 1, 9248923], pa.uint64()))
    problems = D.check_embed(path, bad, mapping)
    assert len(problems) == 1 and "global_seed" in problems[0] and "rows [1]" in problems[0]
    assert D.check_embed(path, {"manifest_fingerprint": FP}, {"manifest_fingerprint": "manifest_fingerprint"}) == []
    assert D.check_embed(path, {"manifest_fingerprint": "f" * 64}, {"manifest_fingerprint": "manifest_fingerprint"})
    assert D.check_embed(path, good, {"parameter_hash": "parameter_hash"})  # path carries no parameter_hash
    assert D.check_embed(path, good.drop_columns(["global_seed"]), mapping)
    ev = D.load("1A").path("rng_event", **TOKENS) + "/part-00000.jsonl"
    assert D.parse_tokens(ev)["family"] == "gumbel_key"


def test_parse_tokens_refuses_conflicting_duplicates():
    with pytest.raises(EngineError, match="E_PARTITION_MISPLACED"):
        D.parse_tokens("data/seed=1/x/seed=2/part-00000.parquet")


# ---------------------------------------------------------------------- row schemas
ROW_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema", "title": "demo", "type": "object",
    "additionalProperties": False, "required": ["merchant_id", "legal_country_iso", "share", "flag"],
    "properties": {
        "merchant_id": {"type": "integer", "minimum": 1, "maximum": 18446744073709551615, "x-arrow": "uint64"},
        "legal_country_iso": {"type": "string", "pattern": "^[A-Z]{2}$", "x-arrow": "string"},
        "share": {"type": "number", "minimum": 0.0, "maximum": 1.0, "x-arrow": "float64"},
        "flag": {"type": "boolean", "x-arrow": "bool"},
        "maybe": {"type": ["integer", "null"], "x-arrow": "int64"},
        "kind": {"type": "string", "enum": ["a", "b"], "x-arrow": "string"},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]+$"}, "x-arrow": "list<string>"},
    },
    "x-column-order": ["merchant_id", "legal_country_iso", "share", "flag", "maybe", "kind", "tags"],
}


def _good_table() -> pa.Table:
    return pa.table({
        "merchant_id": pa.array([1, 2 ** 64 - 1], pa.uint64()),
        "legal_country_iso": ["GB", "NA"],
        "share": [0.25, 1.0],
        "flag": [True, False],
        "maybe": pa.array([None, -3], pa.int64()),
        "kind": ["a", "b"],
        "tags": pa.array([["x"], []], pa.list_(pa.string())),
    })


def test_arrow_schema_follows_column_order_and_nullability():
    sch = S.arrow_schema(ROW_SCHEMA)
    assert sch.names == ROW_SCHEMA["x-column-order"]
    assert sch.field("merchant_id").type == pa.uint64() and not sch.field("merchant_id").nullable
    assert sch.field("maybe").nullable
    assert sch.field("tags").type == pa.list_(pa.string())
    assert sch.metadata is None


def test_validate_table_accepts_valid_and_names_offending_rows():
    assert S.validate_table(_good_table(), ROW_SCHEMA) == []
    t = _good_table()
    bad = t.set_column(1, "legal_country_iso", pa.array(["GB", "gb"]))
    bad = bad.set_column(2, "share", pa.array([1.5, float("nan")]))
    bad = bad.set_column(5, "kind", pa.array(["a", "z"]))
    bad = bad.set_column(6, "tags", pa.array([["x"], ["Y"]], pa.list_(pa.string())))
    problems = S.validate_table(bad, ROW_SCHEMA)
    text = "\n".join(problems)
    assert "legal_country_iso: does not match ^[A-Z]{2}$ at rows [1]" in text
    assert "share: above maximum 1.0 at rows [0]" in text
    assert "share: NaN at rows [1]" in text
    assert "kind: value not in ['a', 'b'] at rows [1]" in text
    assert "tags[]: does not match ^[a-z]+$ at rows [1]" in text


def test_validate_table_structure_problems():
    t = _good_table()
    assert S.validate_table(t.drop_columns(["flag"]), ROW_SCHEMA) == ["missing column flag"]
    assert S.validate_table(t.append_column("extra", pa.array([1, 2])), ROW_SCHEMA) == ["unexpected columns ['extra']"]
    wrong = t.set_column(0, "merchant_id", pa.array([1, 2], pa.int64()))
    assert S.validate_table(wrong, ROW_SCHEMA) == ["merchant_id: arrow type int64, expected uint64"]
    nulls = t.set_column(3, "flag", pa.array([None, True], pa.bool_()))
    assert S.validate_table(nulls, ROW_SCHEMA) == ["flag: null in non-nullable column at rows [0] (1 rows)"]
    zero = t.set_column(0, "merchant_id", pa.array([0, 5], pa.uint64()))
    assert S.validate_table(zero, ROW_SCHEMA) == ["merchant_id: below minimum 1 at rows [0] (1 rows)"]


def test_validate_record_and_schema_resolution(tmp_path):
    rec = {"merchant_id": 2 ** 64 - 1, "legal_country_iso": "GB", "share": 0.5, "flag": True}
    assert S.validate_record(rec, ROW_SCHEMA) == []
    probs = S.validate_record({**rec, "legal_country_iso": "gb", "zzz": 1}, ROW_SCHEMA)
    assert len(probs) == 2
    assert S.validate_record({**rec, "merchant_id": 2 ** 64}, ROW_SCHEMA)
    p = tmp_path / "s.schema.json"
    p.write_text(json.dumps(ROW_SCHEMA))
    assert S.load_schema(p) == ROW_SCHEMA
    assert S.load_schema(f"{p}#/properties/flag") == ROW_SCHEMA["properties"]["flag"]
    with pytest.raises(EngineError, match="E_SCHEMA_RESOLUTION_FAILED"):
        S.load_schema("schemas/none/nothing.schema.json")
    assert S.load_schema("schemas/rng/gumbel_key.schema.json")["title"] == "rng_event.gumbel_key"
