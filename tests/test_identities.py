"""Identities (00-core §1; decisions 3, 4, 9, 13, 15): golden vectors, sensitivity, errors, caching, 1B hashes."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import yaml

from engine.core import identities as I
from engine.core.context import SegmentIds
from engine.core.errors import IdentityError

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data" / "identities"

PH_GOLDEN = "26b7e7a8fc309440d7e5ad6fc490956da6d18e7a47f76b69f40893f69ff53a9e"
FP_GOLDEN = "991c57a380d81d7ab9ba4901efb0d0db3eb7a82af59249d7cc71017126622709"
GIT_SHA1 = "1dc31c0e76779718d322e4f4f6fb854d9b10fc3e"


def _jsonl(name: str) -> list[dict]:
    return [json.loads(ln) for ln in (DATA / name).read_text().splitlines() if ln.strip()]


def _d(i: int) -> bytes:
    return hashlib.sha256(b"file-%d" % i).digest()


def _default_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def _code(e) -> str:
    return e.value.code


# ----------------------------------------------------------------------------------------------
# golden vectors from the upstream S0 reference run
# ----------------------------------------------------------------------------------------------


def test_parameter_hash_golden_vector():
    rows = _jsonl("param_digest_log.jsonl")
    entries = [(r["filename"], bytes.fromhex(r["sha256_hex"])) for r in rows]
    hx, b = I.parameter_hash(entries)
    assert hx == PH_GOLDEN and b == bytes.fromhex(PH_GOLDEN)
    # order of the input list is irrelevant (sorted by basename inside)
    assert I.parameter_hash(list(reversed(entries)))[0] == PH_GOLDEN


def test_manifest_fingerprint_golden_vector():
    rows = _jsonl("fingerprint_artifacts.jsonl")
    assert len(rows) == 9
    arts = [(r["filename"], bytes.fromhex(r["sha256_hex"])) for r in rows]
    git32 = I.commit_bytes32(GIT_SHA1)
    assert git32 == bytes(12) + bytes.fromhex(GIT_SHA1)
    hx, b = I.manifest_fingerprint(arts, git32, bytes.fromhex(PH_GOLDEN))
    assert hx == FP_GOLDEN and b.hex() == FP_GOLDEN
    # flipping any single input changes it
    assert I.manifest_fingerprint(arts, bytes(32), bytes.fromhex(PH_GOLDEN))[0] != FP_GOLDEN
    assert I.manifest_fingerprint(arts[1:], git32, bytes.fromhex(PH_GOLDEN))[0] != FP_GOLDEN


def test_parameter_hash_layout_matches_spec_formula():
    entries = [("b.yaml", _d(2)), ("a.yaml", _d(1))]
    t = [hashlib.sha256(struct.pack("<I", len(n)) + n.encode() + d).digest() for n, d in sorted(entries)]
    assert I.parameter_hash(entries)[1] == hashlib.sha256(b"".join(t)).digest()


def test_commit_bytes32():
    assert I.commit_bytes32("ab" * 32) == bytes.fromhex("ab" * 32)
    for bad in ("ab" * 16, "zz" * 20, 123):
        with pytest.raises(IdentityError) as e:
            I.commit_bytes32(bad)  # type: ignore[arg-type]
        assert _code(e) == "E_GIT_BYTES"


# ----------------------------------------------------------------------------------------------
# run_id (decision 15)
# ----------------------------------------------------------------------------------------------


def test_run_id_formula_determinism_and_sensitivity():
    fp, ph, seed = FP_GOLDEN, PH_GOLDEN, 9248923
    rid = I.run_id("1A", fp, ph, seed)
    u = lambda s: struct.pack("<I", len(s)) + s.encode()  # noqa: E731
    want = hashlib.sha256(
        u("run_id") + u("1A") + bytes.fromhex(fp) + bytes.fromhex(ph) + struct.pack("<Q", seed)
    ).hexdigest()[:32]
    assert rid == want and len(rid) == 32
    assert I.run_id("1A", fp, ph, seed) == rid  # no clock, no randomness
    others = {
        I.run_id("1B", fp, ph, seed),
        I.run_id("1A", PH_GOLDEN, ph, seed),
        I.run_id("1A", fp, FP_GOLDEN, seed),
        I.run_id("1A", fp, ph, seed + 1),
        I.run_id("1A", fp, ph, 2**64 - 1),
    }
    assert rid not in others and len(others) == 5


def test_run_id_errors():
    with pytest.raises(IdentityError) as e:
        I.run_id("1C", FP_GOLDEN, PH_GOLDEN, 1)
    assert _code(e) == "E_SEGMENT_UNKNOWN"
    for bad_seed in (-1, 2**64, True, 1.0):
        with pytest.raises(IdentityError) as e:
            I.run_id("1A", FP_GOLDEN, PH_GOLDEN, bad_seed)  # type: ignore[arg-type]
        assert _code(e) == "E_SEED_RANGE"
    for bad in (FP_GOLDEN.upper(), FP_GOLDEN[:-2], "g" * 64):
        with pytest.raises(IdentityError) as e:
            I.run_id("1A", bad, PH_GOLDEN, 1)
        assert _code(e) == "E_BAD_HEX_ENCODING"


# ----------------------------------------------------------------------------------------------
# error codes of the pure functions
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entries, code",
    [
        ([], "E_PARAM_EMPTY"),
        ([("café.yaml", _d(1))], "E_PARAM_NONASCII_NAME"),
        ([("", _d(1))], "E_PARAM_NONASCII_NAME"),
        ([("a.yaml", _d(1)), ("a.yaml", _d(2))], "E_PARAM_DUP_BASENAME"),
        ([("a.yaml", b"\x00" * 31)], "E_BAD_HEX_ENCODING"),
        ([("a.yaml", _d(1).hex())], "E_BAD_HEX_ENCODING"),
    ],
)
def test_parameter_hash_errors(entries, code):
    with pytest.raises(IdentityError) as e:
        I.parameter_hash(entries)
    assert _code(e) == code


@pytest.mark.parametrize(
    "arts, code32, ph, code",
    [
        ([], bytes(32), bytes(32), "E_ARTIFACT_EMPTY"),
        ([("ñ", _d(1))], bytes(32), bytes(32), "E_ARTIFACT_NONASCII_NAME"),
        ([("x", _d(1)), ("x", _d(2))], bytes(32), bytes(32), "E_ARTIFACT_DUP_BASENAME"),
        ([("x", _d(1))], bytes(31), bytes(32), "E_GIT_BYTES"),
        ([("x", _d(1))], GIT_SHA1.encode(), bytes(32), "E_GIT_BYTES"),  # ASCII hex is never git_32
        ([("x", _d(1))], "00" * 32, bytes(32), "E_GIT_BYTES"),
        ([("x", _d(1))], bytes(32), None, "E_PARAM_HASH_ABSENT"),
        ([("x", _d(1))], bytes(32), bytes(16), "E_PARAM_HASH_ABSENT"),
    ],
)
def test_manifest_fingerprint_errors(arts, code32, ph, code):
    with pytest.raises(IdentityError) as e:
        I.manifest_fingerprint(arts, code32, ph)
    assert _code(e) == code


# ----------------------------------------------------------------------------------------------
# code digest (decision 3) and git provenance
# ----------------------------------------------------------------------------------------------


def _mini_repo(root: Path) -> Path:
    (root / "engine" / "core" / "__pycache__").mkdir(parents=True)
    (root / "engine" / "__init__.py").write_text("")
    (root / "engine" / "core" / "a.py").write_text("X = 1\n")
    (root / "engine" / "core" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\x00junk")
    (root / "rules").mkdir()
    (root / "rules" / "segment_1a.smk").write_text("rule a:\n  output: 'x'\n")
    (root / "rules" / "notes.txt").write_text("not a rule file")
    (root / "Snakefile").write_text("include: 'rules/segment_1a.smk'\n")
    (root / "docs").mkdir()
    (root / "docs" / "README.md").write_text("docs")
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text("def test(): pass\n")
    return root


def test_code_digest_layout_and_scope(tmp_path):
    root = _mini_repo(tmp_path)
    files = I.code_files(root)
    assert files == ["Snakefile", "engine/__init__.py", "engine/core/a.py", "rules/segment_1a.smk"]
    u = lambda s: struct.pack("<I", len(s.encode())) + s.encode()  # noqa: E731
    want = hashlib.sha256(b"".join(u(f) + hashlib.sha256((root / f).read_bytes()).digest() for f in files)).digest()
    d0 = I.code_digest(root)
    assert d0 == want and len(d0) == 32
    # docs, tests, caches and non-.smk files under rules/ do not count
    (root / "docs" / "README.md").write_text("changed docs")
    (root / "tests" / "test_x.py").write_text("changed test")
    (root / "engine" / "core" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"other")
    (root / "rules" / "notes.txt").write_text("changed")
    assert I.code_digest(root) == d0
    # engine code, rules and the Snakefile do
    (root / "engine" / "core" / "a.py").write_text("X = 2\n")
    d1 = I.code_digest(root)
    assert d1 != d0
    (root / "rules" / "segment_1a.smk").write_text("rule a:\n  output: 'y'\n")
    assert I.code_digest(root) != d1
    # a renamed file (same bytes) changes it: paths are part of the digest
    (root / "engine" / "core" / "a.py").rename(root / "engine" / "core" / "b.py")
    assert "engine/core/b.py" in I.code_files(root)


def test_code_digest_empty_tree(tmp_path):
    with pytest.raises(IdentityError) as e:
        I.code_digest(tmp_path)
    assert _code(e) == "E_CODE_DIGEST_EMPTY"


def test_git_commit_reads_dot_git_and_never_fails(tmp_path):
    assert I.git_commit(tmp_path) is None
    g = tmp_path / ".git"
    (g / "refs" / "heads").mkdir(parents=True)
    (g / "HEAD").write_text("ref: refs/heads/main\n")
    assert I.git_commit(tmp_path) is None  # unborn branch
    (g / "packed-refs").write_text(f"# pack-refs with: peeled\n{GIT_SHA1} refs/heads/main\n")
    assert I.git_commit(tmp_path) == GIT_SHA1
    (g / "refs" / "heads" / "main").write_text("ab" * 20 + "\n")
    assert I.git_commit(tmp_path) == "ab" * 20
    (g / "HEAD").write_text("cd" * 20 + "\n")  # detached
    assert I.git_commit(tmp_path) == "cd" * 20
    (g / "HEAD").write_bytes(b"\xff\xfe garbage")
    assert I.git_commit(tmp_path) is None


# ----------------------------------------------------------------------------------------------
# resolve_1a on the embedded default and on edited copies
# ----------------------------------------------------------------------------------------------


def test_required_parameters_are_the_default_config_keys():
    cfg = _default_config()
    assert set(I.required_parameters("1A")) == set(cfg["segment1a"]["parameters"])
    assert set(I.required_parameters("1B")) == set(cfg["segment1b"]["parameters"])
    assert set(I.REQUIRED_INPUTS_1A) <= set(cfg["segment1a"]["inputs"])


def test_resolve_1a_default_config():
    cfg = _default_config()
    r = I.resolve_1a(cfg, REPO)
    names = [e["name"] for e in r.param_entries]
    assert names == sorted(list(cfg["segment1a"]["parameters"]) + ["options.1A.json"], key=str.encode)
    art = {e["name"] for e in r.artifact_entries}
    assert art == set(cfg["segment1a"]["inputs"]) | set(names)
    # the pure functions reproduce the record
    ph = I.parameter_hash([(e["name"], bytes.fromhex(e["sha256"])) for e in r.param_entries])
    assert ph == (r.parameter_hash, r.parameter_hash_bytes)
    fp = I.manifest_fingerprint(
        [(e["name"], bytes.fromhex(e["sha256"])) for e in r.artifact_entries], I.code_digest(REPO), ph[1]
    )
    assert fp == (r.manifest_fingerprint, r.fingerprint_bytes)
    assert r.run_id == I.run_id("1A", r.manifest_fingerprint, r.parameter_hash, cfg["seed"])
    assert r.code_digest_hex == I.code_digest(REPO).hex()
    assert r.options == I.DEFAULT_OPTIONS_1A
    assert r.ids == SegmentIds("1A", cfg["seed"], r.parameter_hash, r.manifest_fingerprint, r.run_id)
    # file entries carry their real digests and sizes
    for e in r.param_entries + r.artifact_entries:
        if e["path"] is not None:
            b = Path(e["path"]).read_bytes()
            assert e["sha256"] == hashlib.sha256(b).hexdigest() and e["size_bytes"] == len(b)
    opt = next(e for e in r.param_entries if e["name"] == "options.1A.json")
    canon = json.dumps(I.DEFAULT_OPTIONS_1A, sort_keys=True, separators=(",", ":")).encode()
    assert opt["sha256"] == hashlib.sha256(canon).hexdigest() and opt["path"] is None
    # same config, relative or absolute paths -> same identities
    cfg_abs = copy.deepcopy(cfg)
    for sec in ("inputs", "parameters"):
        cfg_abs["segment1a"][sec] = {k: str(REPO / v) for k, v in cfg["segment1a"][sec].items()}
    r2 = I.resolve_1a(cfg_abs, REPO)
    assert (r2.parameter_hash, r2.manifest_fingerprint, r2.run_id) == (r.parameter_hash, r.manifest_fingerprint, r.run_id)
    json.dumps(r.to_record())  # serialisable


def _copy_config(tmp_path: Path, keys: list[tuple[str, str]]) -> dict:
    """Default config with the named files copied under tmp_path (absolute paths)."""
    cfg = _default_config()
    for sec, key in keys:
        src = REPO / cfg["segment1a"][sec][key]
        dst = tmp_path / sec / Path(src).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        cfg["segment1a"][sec][key] = str(dst)
    return cfg


def _flip_byte(p: Path, offset: int = -10) -> None:
    b = bytearray(p.read_bytes())
    b[offset] ^= 0x01
    p.write_bytes(bytes(b))


def test_one_byte_of_a_sealed_input_changes_the_fingerprint_only(tmp_path):
    cfg = _copy_config(tmp_path, [("inputs", "merchant_table")])
    base = I.resolve_1a(cfg, REPO)
    p = Path(cfg["segment1a"]["inputs"]["merchant_table"])
    _flip_byte(p)
    r = I.resolve_1a(cfg, REPO)
    assert r.manifest_fingerprint != base.manifest_fingerprint and r.run_id != base.run_id
    assert r.parameter_hash == base.parameter_hash  # an input is not a parameter (decision 13)


def test_one_byte_of_a_parameter_changes_both(tmp_path):
    cfg = _copy_config(tmp_path, [("parameters", "s6_selection_policy.yaml")])
    base = I.resolve_1a(cfg, REPO)
    p = Path(cfg["segment1a"]["parameters"]["s6_selection_policy.yaml"])
    p.write_bytes(p.read_bytes() + b"# comment\n")
    r = I.resolve_1a(cfg, REPO)
    assert r.parameter_hash != base.parameter_hash and r.manifest_fingerprint != base.manifest_fingerprint


def test_touch_and_relocation_keep_identities(tmp_path):
    cfg = _copy_config(tmp_path, [("inputs", "iso_table"), ("parameters", "hurdle_coefficients.yaml")])
    base = I.resolve_1a(cfg, REPO)
    default = I.resolve_1a(_default_config(), REPO)
    # files live elsewhere but carry the same bytes: hashed under role/config names, so nothing changes
    assert (base.parameter_hash, base.manifest_fingerprint) == (default.parameter_hash, default.manifest_fingerprint)
    for sec, key in (("inputs", "iso_table"), ("parameters", "hurdle_coefficients.yaml")):
        p = Path(cfg["segment1a"][sec][key])
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    r = I.resolve_1a(cfg, REPO, tmp_path / "cache.json")
    assert (r.parameter_hash, r.manifest_fingerprint, r.run_id) == (base.parameter_hash, base.manifest_fingerprint, base.run_id)


def test_options_are_part_of_parameter_hash():
    cfg = _default_config()
    base = I.resolve_1a(cfg, REPO)
    seen = {base.parameter_hash}
    for k in ("s3_priors", "s3_integerisation", "s3_sequencing", "drop_unplaceable_merchants"):
        c = copy.deepcopy(cfg)
        c["segment1a"]["options"][k] = True
        r = I.resolve_1a(c, REPO)
        assert r.parameter_hash not in seen and r.manifest_fingerprint != base.manifest_fingerprint
        seen.add(r.parameter_hash)
    # an omitted option means its default: same identities
    c = copy.deepcopy(cfg)
    del c["segment1a"]["options"]["drop_unplaceable_merchants"]
    assert I.resolve_1a(c, REPO).parameter_hash == base.parameter_hash
    c["segment1a"]["options"]["s3_priors"] = "yes"
    with pytest.raises(IdentityError) as e:
        I.resolve_1a(c, REPO)
    assert _code(e) == "E_OPTION_INVALID"


def test_seed_changes_run_id_only():
    cfg = _default_config()
    a = I.resolve_1a(cfg, REPO)
    cfg["seed"] = cfg["seed"] + 1
    b = I.resolve_1a(cfg, REPO)
    assert (a.parameter_hash, a.manifest_fingerprint) == (b.parameter_hash, b.manifest_fingerprint)
    assert a.run_id != b.run_id
    cfg["seed"] = 2**64
    with pytest.raises(IdentityError) as e:
        I.resolve_1a(cfg, REPO)
    assert _code(e) == "E_SEED_RANGE"


def test_missing_files_name_the_config_key(tmp_path):
    cfg = _default_config()
    cfg["segment1a"]["parameters"]["ccy_smoothing_params.yaml"] = str(tmp_path / "nope.yaml")
    with pytest.raises(IdentityError) as e:
        I.resolve_1a(cfg, REPO)
    assert _code(e) == "E_PARAM_IO"
    assert "ccy_smoothing_params.yaml" in str(e.value) and "nope.yaml" in str(e.value)
    cfg = _default_config()
    cfg["segment1a"]["inputs"]["gdp_table"] = str(tmp_path / "gdp.parquet")
    with pytest.raises(IdentityError) as e:
        I.resolve_1a(cfg, REPO)
    assert _code(e) == "E_ARTIFACT_IO" and "gdp_table" in str(e.value) and "gdp.parquet" in str(e.value)
    cfg = _default_config()
    cfg["segment1a"]["inputs"]["gdp_table"] = str(tmp_path)  # a directory is not a sealed file
    with pytest.raises(IdentityError) as e:
        I.resolve_1a(cfg, REPO)
    assert _code(e) == "E_ARTIFACT_IO"
    cfg = _default_config()
    del cfg["segment1a"]["inputs"]["bucket_table"]
    with pytest.raises(IdentityError) as e:
        I.resolve_1a(cfg, REPO)
    assert _code(e) == "E_ARTIFACT_IO" and "bucket_table" in str(e.value)


def test_unknown_and_missing_parameter_names():
    cfg = _default_config()
    cfg["segment1a"]["parameters"]["extra_policy.yaml"] = cfg["segment1a"]["parameters"]["s2_validation_policy.yaml"]
    with pytest.raises(IdentityError) as e:
        I.resolve_1a(cfg, REPO)
    assert _code(e) == "E_PARAM_UNKNOWN" and "extra_policy.yaml" in str(e.value)
    cfg = _default_config()
    del cfg["segment1a"]["parameters"]["policy.s3.bounds.yaml"]
    with pytest.raises(IdentityError) as e:
        I.resolve_1a(cfg, REPO)
    assert _code(e) == "E_PARAM_MISSING" and "policy.s3.bounds.yaml" in str(e.value)
    cfg = _default_config()
    cfg["segment1a"]["parameters"] = {}
    with pytest.raises(IdentityError) as e:
        I.resolve_1a(cfg, REPO)
    assert _code(e) == "E_PARAM_EMPTY"


def test_input_role_colliding_with_a_parameter_name():
    cfg = _default_config()
    cfg["segment1a"]["inputs"]["s2_validation_policy.yaml"] = cfg["segment1a"]["parameters"]["s2_validation_policy.yaml"]
    with pytest.raises(IdentityError) as e:
        I.resolve_1a(cfg, REPO)
    assert _code(e) == "E_ARTIFACT_DUP_BASENAME"


# ----------------------------------------------------------------------------------------------
# hash cache and races
# ----------------------------------------------------------------------------------------------


def _old(p: Path) -> None:
    """Back-date a file so it is outside the cache's racy window."""
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - 10_000_000_000))


def test_hash_cache_hits_and_is_atomic_json(tmp_path, monkeypatch):
    f = tmp_path / "x.bin"
    f.write_bytes(b"hello")
    _old(f)
    cache_path = tmp_path / ".snakemake" / "identity-cache.json"
    c = I.HashCache(cache_path)
    d, size = c.digest(f, key="k", io_code="E_PARAM_IO", race_code="E_PARAM_RACE")
    assert d == hashlib.sha256(b"hello").digest() and size == 5 and c.misses == 1
    c.save()
    obj = json.loads(cache_path.read_text())
    assert obj["files"][str(f)]["sha256"] == d.hex()
    assert cache_path.read_text() == json.dumps(obj, sort_keys=True, indent=1) + "\n"
    assert not list(cache_path.parent.glob(".*.tmp"))
    # second instance: served from the cache without reading the file
    monkeypatch.setattr(I, "_hash_file", lambda p: (_ for _ in ()).throw(AssertionError("re-hashed")))
    c2 = I.HashCache(cache_path)
    assert c2.digest(f, key="k", io_code="E_PARAM_IO", race_code="E_PARAM_RACE")[0] == d and c2.hits == 1
    monkeypatch.undo()
    # a changed file (new size/mtime) is re-hashed, never served stale
    f.write_bytes(b"hello!")
    _old(f)
    c3 = I.HashCache(cache_path)
    assert c3.digest(f, key="k", io_code="E_PARAM_IO", race_code="E_PARAM_RACE")[0] == hashlib.sha256(b"hello!").digest()
    assert c3.misses == 1
    # a corrupt cache file is ignored
    cache_path.write_text("{not json")
    assert I.HashCache(cache_path).entries == {}


def test_hash_cache_skips_freshly_written_files(tmp_path):
    f = tmp_path / "fresh.bin"
    f.write_bytes(b"x")
    c = I.HashCache(tmp_path / "cache.json")
    c.digest(f, key="k", io_code="E_PARAM_IO", race_code="E_PARAM_RACE")
    assert str(f) not in c.entries  # same-tick rewrite could otherwise be served stale


def test_resolve_1a_uses_cache(tmp_path, monkeypatch):
    cfg = _copy_config(tmp_path, [("inputs", "merchant_table")])
    p = Path(cfg["segment1a"]["inputs"]["merchant_table"])
    _old(p)
    cache = tmp_path / "cache.json"
    a = I.resolve_1a(cfg, REPO, cache)
    calls = []
    real = I._hash_file
    monkeypatch.setattr(I, "_hash_file", lambda q: calls.append(str(q)) or real(q))
    b = I.resolve_1a(cfg, REPO, cache)
    assert str(p) not in calls
    assert a == b


def test_race_during_hashing(tmp_path, monkeypatch):
    real = I._hash_file

    def writer(p):
        d = real(p)
        if Path(p).is_relative_to(tmp_path):  # only ever touch the test's own copies
            Path(p).write_bytes(Path(p).read_bytes() + b"more")  # the file changes while it is hashed
        return d

    monkeypatch.setattr(I, "_hash_file", writer)
    cfg = _copy_config(tmp_path, [("parameters", "s7_integerisation_policy.yaml")])
    with pytest.raises(IdentityError) as e:
        I.resolve_1a(cfg, REPO)
    assert _code(e) == "E_PARAM_RACE"
    f = tmp_path / "art.bin"
    f.write_bytes(b"abc")
    with pytest.raises(IdentityError) as e:
        I.HashCache(None).digest(f, key="segment1a.inputs.x", io_code="E_ARTIFACT_IO", race_code="E_ARTIFACT_RACE")
    assert _code(e) == "E_ARTIFACT_RACE"


# ----------------------------------------------------------------------------------------------
# 1B (decisions 9, 13)
# ----------------------------------------------------------------------------------------------


def _tif(path: Path, values, transform=None, crs="EPSG:4326") -> Path:
    import numpy as np
    import rasterio
    from affine import Affine

    arr = np.asarray(values, dtype="float32")
    with rasterio.open(
        path, "w", driver="GTiff", width=arr.shape[1], height=arr.shape[0], count=1, dtype="float32",
        crs=crs, transform=transform or Affine(5.0, 0.0, -10.0, 0.0, -5.0, 10.0),
    ) as ds:
        ds.write(arr, 1)
    return path


def _cfg_1b(tmp_path: Path, **opts) -> dict:
    cfg = _default_config()
    tif = _tif(tmp_path / "pop.tif", [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    poly = tmp_path / "countries.geojson"
    poly.write_text('{"type":"FeatureCollection","features":[]}')
    jit = tmp_path / "policy.s6.jitter.yaml"
    jit.write_text("max_attempts: 64\n")
    cfg["segment1b"]["inputs"] = {"world_countries": str(poly), "population_raster": str(tif)}
    cfg["segment1b"]["parameters"] = {"policy.s6.jitter.yaml": str(jit)}
    cfg["segment1b"]["options"] = {"basis": "population", "dp": 6, **opts}
    return cfg


def _ids_1a(fp: str = FP_GOLDEN) -> SegmentIds:
    return SegmentIds("1A", 9248923, PH_GOLDEN, fp, I.run_id("1A", fp, PH_GOLDEN, 9248923))


def test_resolve_1b_structure(tmp_path):
    cfg = _cfg_1b(tmp_path)
    r = I.resolve_1b(cfg, REPO, _ids_1a())
    assert r.seed == 9248923 and r.ids_1a == _ids_1a()
    assert r.grid["width"] == 4 and r.grid["height"] == 3 and r.grid["inclusion_rule"] == I.INCLUSION_RULE
    assert r.grid["transform"] == [5.0, 0.0, -10.0, 0.0, -5.0, 10.0] and "WGS" in r.grid["crs_wkt"]
    poly_sha = hashlib.sha256(Path(cfg["segment1b"]["inputs"]["world_countries"]).read_bytes()).digest()
    g_hex, g_b = I.grid_hash(4, 3, r.grid["transform"], r.grid["crs_wkt"], poly_sha, I.INCLUSION_RULE)
    assert r.grid_hash == g_hex
    ras_sha = hashlib.sha256(Path(cfg["segment1b"]["inputs"]["population_raster"]).read_bytes()).digest()
    assert r.weights_hash == I.weights_hash(g_b, "population", 6, ras_sha)[0]
    names = {e["name"] for e in r.artifact_entries}
    assert names == {"1A.manifest_fingerprint", "world_countries", "population_raster", "policy.s6.jitter.yaml", "options.1B.json"}
    assert r.run_id == I.run_id("1B", r.manifest_fingerprint, r.parameter_hash, 9248923)
    assert r.extra == {"grid_hash": r.grid_hash, "weights_hash": r.weights_hash}
    # the Resolved1A record is accepted as well as SegmentIds
    r1a = I.resolve_1a(_default_config(), REPO)
    rb = I.resolve_1b(cfg, REPO, r1a)
    assert rb.ids_1a == r1a.ids and rb.manifest_fingerprint != r.manifest_fingerprint
    json.dumps(r.to_record())


def test_1b_scoping_consequences(tmp_path):
    cfg = _cfg_1b(tmp_path)
    base = I.resolve_1b(cfg, REPO, _ids_1a())
    # new basis: new 1B parameter_hash, fingerprint and weights, same grid (decision 13)
    c = copy.deepcopy(cfg)
    c["segment1b"]["options"]["basis"] = "area_m2"
    r = I.resolve_1b(c, REPO, _ids_1a())
    assert r.grid_hash == base.grid_hash
    assert r.weights_hash != base.weights_hash and r.parameter_hash != base.parameter_hash
    assert r.manifest_fingerprint != base.manifest_fingerprint
    # new dp: same
    c = copy.deepcopy(cfg)
    c["segment1b"]["options"]["dp"] = 3
    r = I.resolve_1b(c, REPO, _ids_1a())
    assert r.grid_hash == base.grid_hash and r.weights_hash != base.weights_hash and r.parameter_hash != base.parameter_hash
    # an option outside basis/dp is not identity
    c = copy.deepcopy(cfg)
    c["segment1b"]["options"]["skip_s0"] = True
    assert I.resolve_1b(c, REPO, _ids_1a()).parameter_hash == base.parameter_hash
    # new 1A fingerprint (e.g. a new merchant table): new 1B fingerprint, never new grid or weights
    r = I.resolve_1b(cfg, REPO, _ids_1a(PH_GOLDEN))
    assert (r.grid_hash, r.weights_hash, r.parameter_hash) == (base.grid_hash, base.weights_hash, base.parameter_hash)
    assert r.manifest_fingerprint != base.manifest_fingerprint and r.run_id != base.run_id
    # new seed: identical hashes except run_id
    ids = _ids_1a()
    r = I.resolve_1b(cfg, REPO, SegmentIds("1A", ids.seed + 1, ids.parameter_hash, ids.manifest_fingerprint, ids.run_id))
    assert (r.grid_hash, r.weights_hash, r.parameter_hash, r.manifest_fingerprint) == (
        base.grid_hash, base.weights_hash, base.parameter_hash, base.manifest_fingerprint)
    assert r.run_id != base.run_id
    # a 1B policy byte: new 1B parameter_hash and fingerprint, same grid/weights
    jit = Path(cfg["segment1b"]["parameters"]["policy.s6.jitter.yaml"])
    jit.write_text("max_attempts: 65\n")
    r = I.resolve_1b(cfg, REPO, _ids_1a())
    assert r.parameter_hash != base.parameter_hash and (r.grid_hash, r.weights_hash) == (base.grid_hash, base.weights_hash)


def test_1b_grid_and_weights_hash_inputs(tmp_path):
    cfg = _cfg_1b(tmp_path)
    base = I.resolve_1b(cfg, REPO, _ids_1a())
    c_uni = copy.deepcopy(cfg)
    c_uni["segment1b"]["options"]["basis"] = "uniform"
    base_uni = I.resolve_1b(c_uni, REPO, _ids_1a())
    # new raster values on the same grid: grid unchanged; population weights change, uniform weights do not
    _tif(Path(cfg["segment1b"]["inputs"]["population_raster"]), [[9, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    r = I.resolve_1b(cfg, REPO, _ids_1a())
    ru = I.resolve_1b(c_uni, REPO, _ids_1a())
    assert r.grid_hash == base.grid_hash and r.weights_hash != base.weights_hash
    assert ru.grid_hash == base_uni.grid_hash and ru.weights_hash == base_uni.weights_hash
    # new grid definition (transform): new grid hash
    from affine import Affine

    _tif(Path(cfg["segment1b"]["inputs"]["population_raster"]), [[1] * 4] * 3,
         transform=Affine(2.5, 0.0, -10.0, 0.0, -5.0, 10.0))
    assert I.resolve_1b(cfg, REPO, _ids_1a()).grid_hash != base.grid_hash
    _tif(Path(cfg["segment1b"]["inputs"]["population_raster"]), [[1] * 4] * 3, crs="EPSG:3857")
    assert I.resolve_1b(cfg, REPO, _ids_1a()).grid_hash != base.grid_hash
    _tif(Path(cfg["segment1b"]["inputs"]["population_raster"]), [[1] * 5] * 3)
    assert I.resolve_1b(cfg, REPO, _ids_1a()).grid_hash != base.grid_hash
    # new polygon bytes: new grid hash
    _tif(Path(cfg["segment1b"]["inputs"]["population_raster"]), [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    Path(cfg["segment1b"]["inputs"]["world_countries"]).write_text('{"type":"FeatureCollection","features":[] }')
    assert I.resolve_1b(cfg, REPO, _ids_1a()).grid_hash != base.grid_hash
    # the inclusion rule is part of the grid hash
    t = [1.0, 0.0, 0.0, 0.0, -1.0, 0.0]
    assert I.grid_hash(4, 3, t, "", bytes(32), "centre") != I.grid_hash(4, 3, t, "", bytes(32), "any_overlap")


def test_1b_errors(tmp_path):
    cfg = _cfg_1b(tmp_path)
    c = copy.deepcopy(cfg)
    c["segment1b"]["options"]["basis"] = "nightlights"
    with pytest.raises(IdentityError) as e:
        I.resolve_1b(c, REPO, _ids_1a())
    assert _code(e) == "E_OPTION_INVALID"
    c = copy.deepcopy(cfg)
    c["segment1b"]["options"]["dp"] = 19
    with pytest.raises(IdentityError) as e:
        I.resolve_1b(c, REPO, _ids_1a())
    assert _code(e) == "E_OPTION_INVALID"
    c = copy.deepcopy(cfg)
    c["segment1b"]["parameters"]["policy.s6.jitter.yaml"] = str(tmp_path / "missing.yaml")
    with pytest.raises(IdentityError) as e:
        I.resolve_1b(c, REPO, _ids_1a())
    assert _code(e) == "E_PARAM_IO" and "policy.s6.jitter.yaml" in str(e.value)
    c = copy.deepcopy(cfg)
    c["segment1b"]["parameters"]["other.yaml"] = c["segment1b"]["parameters"]["policy.s6.jitter.yaml"]
    with pytest.raises(IdentityError) as e:
        I.resolve_1b(c, REPO, _ids_1a())
    assert _code(e) == "E_PARAM_UNKNOWN"
    c = copy.deepcopy(cfg)
    not_a_raster = tmp_path / "not.tif"
    not_a_raster.write_bytes(b"GIF89a")
    c["segment1b"]["inputs"]["population_raster"] = str(not_a_raster)
    with pytest.raises(IdentityError) as e:
        I.resolve_1b(c, REPO, _ids_1a())
    assert _code(e) == "E_ARTIFACT_IO"
    c = copy.deepcopy(cfg)
    c["segment1b"]["inputs"]["world_countries"] = str(tmp_path / "none.gpkg")
    with pytest.raises(IdentityError) as e:
        I.resolve_1b(c, REPO, _ids_1a())
    assert _code(e) == "E_ARTIFACT_IO" and "world_countries" in str(e.value)
    with pytest.raises(IdentityError):
        I.resolve_1b(cfg, REPO, object())  # type: ignore[arg-type]
