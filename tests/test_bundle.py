"""Validation bundles, index.json, _passed.flag and the consumer gate (00-core 5.1-5.3, decision 27)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from engine.core import bundle as B
from engine.core.errors import GateError, PublishError

DATA = Path(__file__).parent / "data" / "bundle"

FILES = {
    "MANIFEST.json": {"version": "1A.validation.v1", "manifest_fingerprint": "b" * 64},
    "s9_summary.json": {"run": {"decision": "PASS"}},
    "rng_accounting.json": {"families": {}},
    "egress_checksums.json": {"files": []},
    "param_digest_log.jsonl": b'{"filename":"a.yaml"}\n',
    "lint/DICTIONARY_LINT.txt": b"ok\n",
}


def _independent_digest(folder: Path) -> str:
    """SHA-256 over every non-flag file, ASCII path order (00-core 5.2), computed without bundle.py."""
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
                   and p.name != "_passed.flag")
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda s: s.encode("ascii")):
        h.update((folder / p).read_bytes())
    return h.hexdigest()


def _make(tmp_path: Path, passed: bool = True) -> Path:
    d = tmp_path / "data/layer1/1A/validation/seed=1" / f"fingerprint={'b' * 64}"
    B.write_bundle(d, FILES, kinds={"param_digest_log.jsonl": "table"}, passed=passed,
                   code="E_IMMUTABLE_PARTITION_EXISTS_NONIDENTICAL")
    return d


def test_write_bundle_index_flag_and_verify(tmp_path):
    d = _make(tmp_path)
    index = json.loads((d / "index.json").read_bytes())
    paths = [e["path"] for e in index]
    assert paths == sorted(paths, key=lambda s: s.encode("ascii"))
    assert paths[0] == "MANIFEST.json"  # upper case first in ASCII order
    assert "index.json" in paths and "_passed.flag" not in paths
    by_path = {e["path"]: e for e in index}
    assert by_path["index.json"]["artifact_id"] == "index"
    assert by_path["MANIFEST.json"]["artifact_id"] == "MANIFEST"
    assert by_path["lint/DICTIONARY_LINT.txt"]["artifact_id"] == "lint.DICTIONARY_LINT"
    assert by_path["param_digest_log.jsonl"]["kind"] == "table"
    assert by_path["MANIFEST.json"]["mime"] == "application/json"
    digest = _independent_digest(d)
    assert (d / "_passed.flag").read_bytes() == f"sha256_hex = {digest}\n".encode("ascii")
    assert B.flag_digest(d) == digest
    assert B.verify_bundle(d) == digest
    # JSON members are canonical
    assert (d / "MANIFEST.json").read_bytes() == b'{"manifest_fingerprint":"' + b"b" * 64 + \
        b'","version":"1A.validation.v1"}\n'


def test_rewrite_identical_is_noop_and_pass_bundle_is_immutable(tmp_path):
    d = _make(tmp_path)
    before = _snapshot(d)
    _make(tmp_path)
    assert _snapshot(d) == before
    with pytest.raises(PublishError) as ei:
        B.write_bundle(d, {**FILES, "s9_summary.json": {"run": {"decision": "PASS", "x": 1}}}, passed=True,
                       code="E913_ATOMIC_PUBLISH_VIOLATION")
    assert ei.value.code == "E913_ATOMIC_PUBLISH_VIOLATION"
    assert _snapshot(d) == before


def _snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_fail_bundle_has_no_flag_and_may_be_replaced(tmp_path):
    d = _make(tmp_path, passed=False)
    assert not (d / "_passed.flag").exists()
    with pytest.raises(GateError) as ei:
        B.verify_bundle(d)
    assert ei.value.code == "E_PASS_MISSING"
    assert str(ei.value).startswith("No PASS -> no read:")
    assert str(d) in str(ei.value)
    d2 = _make(tmp_path, passed=True)  # a later PASS replaces the flag-less FAIL bundle
    assert d2 == d and B.verify_bundle(d)


def _expect(d: Path, code: str) -> GateError:
    with pytest.raises(GateError) as ei:
        B.verify_bundle(d)
    err = ei.value
    assert err.code == code, str(err)
    assert str(err).startswith("No PASS -> no read:")
    assert str(d) in str(err)
    return err


def test_gate_codes_for_each_kind_of_damage(tmp_path):
    base = _make(tmp_path)

    def copy(name: str) -> Path:
        c = tmp_path / name
        shutil.copytree(base, c)
        return c

    _expect(tmp_path / "absent", "E_BUNDLE_MISSING")

    c = copy("no_index")
    (c / "index.json").unlink()
    _expect(c, "E_INDEX_MISSING")

    c = copy("index_not_json")
    (c / "index.json").write_bytes(b"[{")
    _expect(c, "E_INDEX_INVALID")

    c = copy("unlisted")
    (c / "extra.json").write_bytes(b"{}\n")
    err = _expect(c, "E_INDEX_INVALID")
    assert "extra.json" in str(err)

    c = copy("listed_absent")
    (c / "rng_accounting.json").unlink()
    _expect(c, "E_INDEX_INVALID")

    c = copy("dup_id")
    idx = json.loads((c / "index.json").read_bytes())
    idx[1]["artifact_id"] = idx[0]["artifact_id"]
    (c / "index.json").write_bytes(json.dumps(idx).encode())
    _expect(c, "E_INDEX_INVALID")

    c = copy("dotdot")
    idx = json.loads((c / "index.json").read_bytes())
    idx.append({"artifact_id": "evil", "kind": "text", "path": "../evil.txt"})
    (c / "index.json").write_bytes(json.dumps(idx).encode())
    _expect(c, "E_INDEX_INVALID")

    c = copy("no_flag")
    (c / "_passed.flag").unlink()
    _expect(c, "E_PASS_MISSING")

    c = copy("upper_hex")
    (c / "_passed.flag").write_text("sha256_hex = " + "ABCDEF0123456789" * 4 + "\n")
    _expect(c, "E_FLAG_FORMAT_INVALID")

    c = copy("two_newlines")
    (c / "_passed.flag").write_bytes((base / "_passed.flag").read_bytes() + b"\n")
    _expect(c, "E_FLAG_FORMAT_INVALID")

    c = copy("tampered")
    p = c / "s9_summary.json"
    p.write_bytes(p.read_bytes().replace(b"PASS", b"FAIL"))
    err = _expect(c, "E_FLAG_HASH_MISMATCH")
    assert B.flag_digest(c) in str(err)

    c = copy("wrong_flag")
    (c / "_passed.flag").write_bytes(b"sha256_hex = " + b"0" * 64 + b"\n")
    _expect(c, "E_FLAG_HASH_MISMATCH")


def test_flag_without_trailing_newline_is_accepted(tmp_path):
    d = _make(tmp_path)
    (d / "_passed.flag").write_bytes((d / "_passed.flag").read_bytes().rstrip(b"\n"))  # runbook-era form
    assert B.verify_bundle(d) == _independent_digest(d)


def test_bundle_refuses_reserved_and_unsafe_paths(tmp_path):
    for bad in ({"index.json": b"[]"}, {"_passed.flag": b""}, {"../x.json": b""}, {"/abs.json": b""},
                {"caf\u00e9.json": b""}):
        with pytest.raises(ValueError):
            B.write_bundle(tmp_path / "b", bad, passed=True)
    assert not (tmp_path / "b").exists()


def test_digest_of_upstream_s0_bundle_files():
    """Mechanics check on real upstream files (tests/data/bundle/README.md): the seven files of the
    2025-10-09 S0 bundle, concatenated in ASCII order, hash to the value coreutils gives. The spec's
    17ca4bc2... vector needs the local_layer1_regen bundle, which is not available here."""
    folder = DATA / "s0_2025-10-09_synthetic"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["MANIFEST.json", "fingerprint_artifacts.jsonl", "manifest_fingerprint_resolved.json",
                     "numeric_policy_attest.json", "param_digest_log.jsonl", "parameter_hash_resolved.json",
                     "validation_summary.json"]
    assert B.digest_files(folder, names) == "b70c53b54f6f5b2311d16d328e4d3f9721af36709ab17dab99eb0fe8a0b0a75c"
    # and the writer reproduces the same mechanics over the same bytes (plus its own index.json)
    assert B.digest_files(folder, list(reversed(names))) == B.digest_files(folder, names)
