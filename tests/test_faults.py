"""Faults: SIGKILL in the middle of long states, rerun, and the Snakemake directory lock (00-core 2.4).

One uninterrupted reference run (session fixture) and one data root that is killed three times:

1. in 1B S1 (``s1b_s1_tile_index``) while it writes its staged ``_tmp.*`` partition;
2. in 1A S2 (``s1a_s2_nb_outlets``, RNG events only) 1 s after its start line (1B S1/S2 restart
   beside it and die with it);
3. in 1B S6 (``s1b_s6_jitter``) 1 s after its start line;

each time the whole process group of the ``snakemake`` run is killed with SIGKILL (the jobs of the
local executor share it). A watcher thread scans ``data/`` all along: every partition a reader can
see (no ``_``/``.``-prefixed path component) must be complete at every instant -- Parquet footers
readable, JSON/JSONL parseable, bundles with their ``index.json`` and a verifiable ``_passed.flag``,
no empty partition directory (except the bundle directory Snakemake creates for S9's declared
``_passed.flag`` before S9 runs; a reader of it gets E_INDEX_MISSING). After each kill the stale
Snakemake lock is removed (``--unlock``) and the run resumed with ``--rerun-incomplete``; the
finished run must give byte-identical ``data/`` and the same RNG logs (modulo ``ts_utc``) as the
uninterrupted run. Staging leftovers (``_tmp.*``) of the killed attempts are swept by the rerun.

A second workflow started on a data root while one runs must be refused (Snakemake builds its DAG
before it locks, so the refusal is the incomplete-output check or the directory lock; with
``--rerun-incomplete`` it is always the lock, whose message names ``--unlock``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from workflow_helpers import REPO, snakemake

pytestmark = pytest.mark.slow

LOCK_MESSAGE = "Directory cannot be locked"
TS_RE = re.compile(rb'"ts_utc":"[^"]*",?')


# ---------------------------------------------------------------------------------------- helpers
def _cmd(root: Path, extra=()) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(root),
            "--cores", "2", "--rerun-triggers", "mtime", *extra]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO))


def _start(root: Path, log: Path, extra=()) -> subprocess.Popen:
    """Start snakemake in its own session, so its process group holds it and every job it runs."""
    root.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:  # the child keeps its own copy of the descriptor
        f.write(f"\n=== {' '.join(_cmd(root, extra))}\n".encode())
        f.flush()
        return subprocess.Popen(_cmd(root, extra), env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the whole process group of a run (snakemake and every job it started)."""
    pgid = proc.pid  # start_new_session: pgid == pid
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    # nothing of the run may survive (a surviving job could still publish after the "kill")
    deadline = time.monotonic() + 10
    while _group_members(pgid):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes {_group_members(pgid)} of group {pgid} survived SIGKILL")
        time.sleep(0.1)


def _log_text(root: Path, pattern: str) -> str:
    hits = sorted(root.glob(pattern))
    return "".join(p.read_text(errors="replace") for p in hits)


def _wait_for(cond, proc: subprocess.Popen, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        if proc.poll() is not None:
            raise AssertionError(f"snakemake exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out ({timeout}s) waiting for {what}:\n{log.read_text()[-4000:]}")


def _state_seconds(root: Path, job_log: str, state: str) -> float:
    """Seconds between a state's start and done lines in the reference run (its job log)."""
    m = re.search(rf"\[{re.escape(state)}\] done in ([0-9.]+)s", _log_text(root, job_log))
    assert m, f"no '[{state}] done in' line in the reference run's {job_log}"
    return float(m.group(1))


def _visible(rel_parts) -> bool:
    return not any(part.startswith(("_", ".")) for part in rel_parts)


def digest(root: Path, sub: str = "data") -> tuple[dict[str, str], list[str]]:
    """(relpath -> sha256 of every reader-visible file under root/sub, staging leftovers).

    Reader-visible = no directory component starting with `_` or `.` (a bundle's own `_passed.flag`
    counts); `_tmp.*` / `_old.*` entries (publish staging) are listed as leftovers instead."""
    base = root / sub
    out: dict[str, str] = {}
    leftovers: list[str] = []
    for dirpath, dirnames, filenames in os.walk(base):
        d = Path(dirpath)
        for x in sorted(dirnames):
            if x.startswith(("_tmp", "_old")):
                leftovers.append(str((d / x).relative_to(root)) + "/")
        dirnames[:] = sorted(x for x in dirnames if not x.startswith(("_", ".")))
        for f in sorted(filenames):
            if f.startswith(("_tmp", "_old")):
                leftovers.append(str((d / f).relative_to(root)))
                continue
            p = d / f
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out, sorted(leftovers)


def rng_logs_without_ts(root: Path) -> dict[str, bytes]:
    """Every RNG log line file (events, trace, audit) with its ts_utc fields removed."""
    out = {}
    base = root / "logs" / "rng"
    for p in sorted(base.rglob("*.jsonl")):
        rel = p.relative_to(base)
        if _visible(rel.parts):
            out[str(rel)] = TS_RE.sub(b"", p.read_bytes())
    return out


def partition_patterns() -> list[tuple[str, re.Pattern]]:
    """(dataset_id, regex of its partition directory relative to the data root) for every directory
    dataset under data/ in both dictionaries (the only place path templates are written)."""
    from engine.core import dictionary

    out = []
    for seg in ("1A", "1B"):
        d = dictionary.load(seg)
        for ds in d.ids():
            e = d.entry(ds)
            if e.is_dir and e.path.startswith("data/"):
                rx = re.escape(e.path.rstrip("/"))
                rx = re.sub(r"\\\{[a-z_]+\\\}", "[^/_.][^/]*", rx)
                out.append((ds, re.compile(rx + "$")))
    return out


class Watcher(threading.Thread):
    """Scans data/ continuously; records every reader-visible partition that is not complete."""

    def __init__(self, root: Path):
        super().__init__(daemon=True)
        self.root = root
        self.stop = threading.Event()
        self.problems: list[str] = []
        self.scans = 0
        self._ok: set[tuple[str, int, int]] = set()
        self.patterns = partition_patterns()
        self.empty_bundle_dirs: set[str] = set()

    def run(self) -> None:
        while not self.stop.is_set():
            self.scan()
            self.scans += 1
            time.sleep(0.1)
        self.scan()
        self.scans += 1

    def _check_file(self, p: Path) -> str | None:
        try:
            st = p.stat()
        except FileNotFoundError:
            return None  # replaced between listing and stat: a rename, not a partial file
        key = (str(p), st.st_size, st.st_mtime_ns)
        if key in self._ok:
            return None
        try:
            if p.suffix == ".parquet":
                pq.read_metadata(p)
            elif p.suffix == ".json":
                json.loads(p.read_bytes())
            elif p.suffix == ".jsonl":
                data = p.read_bytes()
                if data and not data.endswith(b"\n"):
                    return f"{p}: JSONL without final newline (torn write)"
                for line in data.splitlines():
                    json.loads(line)
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 - any read failure is a partial file
            return f"{p}: unreadable ({type(e).__name__}: {e})"
        self._ok.add(key)
        return None

    def _check_bundle(self, d: Path, names: list[str]) -> str | None:
        """A visible bundle has index.json, every file it lists, and a verifiable flag if flagged."""
        if "index.json" not in names:
            return f"{d}: bundle without index.json"
        try:
            index = json.loads((d / "index.json").read_bytes())
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001
            return f"{d}/index.json unreadable: {e}"
        listed = [e.get("path") for e in index if isinstance(e, dict)] if isinstance(index, list) else []
        missing = [x for x in listed if not isinstance(x, str) or not (d / x).is_file()]
        if not listed or missing:
            return f"{d}: index.json lists missing files {missing[:5]}"
        if "_passed.flag" in names:
            from engine.core.bundle import verify_bundle
            try:
                verify_bundle(d)
            except Exception as e:  # noqa: BLE001
                return f"{d}: _passed.flag does not verify ({e})"
        return None

    def scan(self) -> None:
        base = self.root / "data"
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            d = Path(dirpath)
            dirnames[:] = sorted(x for x in dirnames if not x.startswith(("_", ".")))
            rel = str(d.relative_to(self.root))
            dataset = next((ds for ds, rx in self.patterns if rx.match(rel)), None)
            names = sorted(f for f in filenames if not f.startswith("."))
            if dataset is not None and not dirnames and not names:
                if dataset.startswith("validation_bundle"):
                    # Snakemake creates the parent of a declared output file (`_passed.flag`) before
                    # S9 runs; publish.staged replaces the empty dir in one rename. A reader sees
                    # E_INDEX_MISSING ("No PASS -> no read"), never partial bytes.
                    self.empty_bundle_dirs.add(rel)
                else:
                    self.problems.append(f"{rel}: empty {dataset} partition directory")
                continue
            if dataset is not None and dataset.startswith("validation_bundle"):
                msg = self._check_bundle(d, names)
                if msg:
                    self.problems.append(msg)
            for f in names:
                if f.startswith("_"):
                    continue
                msg = self._check_file(d / f)
                if msg:
                    self.problems.append(msg)


def _kill_mid_state(root: Path, log: Path, job_log: str, state: str, delay: float,
                    staged_parent: str | None = None, extra=()) -> dict:
    """Run until `state` has started (its job log shows the start line) and not finished; wait `delay`
    seconds (or, with staged_parent, until a `_tmp.*` staging dir with files appears there); SIGKILL the
    process group. Returns what was seen at the kill."""
    for p in root.glob(job_log):
        p.unlink()  # the killed attempt's log must not trigger the next kill
    proc = _start(root, log, extra)
    try:
        _wait_for(lambda: f"[{state}] start" in _log_text(root, job_log), proc, 400, f"{state} to start", log)
        if staged_parent is not None:
            def staged():
                par = root / staged_parent
                if not par.is_dir():
                    return None
                for t in par.iterdir():
                    if t.name.startswith("_tmp.") and t.is_dir() and any(t.rglob("*.parquet")):
                        return t
                return None
            tmp = _wait_for(staged, proc, 400, f"a staged _tmp dir of {state}", log)
        else:
            tmp = None
            end = time.monotonic() + delay
            while time.monotonic() < end and proc.poll() is None:
                time.sleep(0.05)
        finished = f"[{state}] done" in _log_text(root, job_log) or f"[{state}] FAILED" in _log_text(root, job_log)
    finally:
        _kill_group(proc)
    assert not finished, f"{state} finished before the kill; the fault was not injected mid-state"
    return {"state": state, "after_start_s": round(delay, 2) if tmp is None else None,
            "staged": tmp.name if tmp else None}


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults_reference")
    snakemake(root, cores=2)
    return root


# ---------------------------------------------------------------------------------------- tests
def test_second_workflow_on_same_data_root_is_refused(tmp_path):
    """Snakemake builds the DAG before it takes the lock: a second run is refused either by the
    incomplete-output check (an output of a running job already exists) or by the directory lock;
    with --rerun-incomplete it always reaches the lock, which refuses it and names --unlock."""
    root = tmp_path / "locked"
    log = tmp_path / "first.log"
    first = _start(root, log)
    try:
        # the first run holds the lock once its lock files exist
        _wait_for(lambda: any((root / ".snakemake" / "locks").glob("*")), first, 120, "the first run's lock", log)
        plain = subprocess.run(_cmd(root), env=_env(), capture_output=True, text=True, timeout=300)
        forced = subprocess.run(_cmd(root, ["--rerun-incomplete"]), env=_env(), capture_output=True, text=True,
                                timeout=300)
        still_running = first.poll() is None
    finally:
        _kill_group(first)
    assert still_running, "the first workflow ended before the second one tried the lock"
    plain_text = plain.stdout + plain.stderr
    assert plain.returncode != 0
    assert LOCK_MESSAGE in plain_text or "IncompleteFilesException" in plain_text, plain_text[-3000:]
    forced_text = forced.stdout + forced.stderr
    assert forced.returncode != 0
    assert LOCK_MESSAGE in forced_text, forced_text[-3000:]
    assert "--unlock" in forced_text  # the message says how to recover from a stale lock
    for text in (plain_text, forced_text):  # refused before running anything
        assert "Finished jobid" not in text and "has been submitted" not in text


def test_sigkill_mid_state_then_rerun_is_byte_identical(reference, tmp_path):
    root = tmp_path / "killed"
    log = tmp_path / "killed.log"
    watcher = Watcher(root)
    watcher.start()
    kills = []
    try:
        # 1. 1B S1 while its staged partition is being written
        kills.append(_kill_mid_state(root, log, "logs/jobs/1B/s1/*.log", "1B.S1", 0,
                                     staged_parent="data/layer1/1B/tile_index"))
        # a stale lock stays after SIGKILL: the next run is refused until --unlock (runbook)
        refused = subprocess.run(_cmd(root, ["--rerun-incomplete"]), env=_env(), capture_output=True, text=True,
                                 timeout=300)
        assert refused.returncode != 0 and LOCK_MESSAGE in refused.stdout + refused.stderr
        subprocess.run(_cmd(root, ["--unlock"]), env=_env(), capture_output=True, text=True, timeout=300, check=True)

        # 2. 1A S2 (RNG events only) while it computes
        # at most 1 s after its start line (the reference took 4-19 s after it on a 2-core box, the first
        # run of a checkout also compiling numba kernels): well inside the state whatever the load
        d2 = _state_seconds(reference, "logs/jobs/1A/s2/*/*.log", "1A.S2")
        kills.append(_kill_mid_state(root, log, "logs/jobs/1A/s2/*/*.log", "1A.S2", min(1.0, d2 / 3),
                                     extra=["--rerun-incomplete"]))
        subprocess.run(_cmd(root, ["--unlock"]), env=_env(), capture_output=True, text=True, timeout=300, check=True)

        # 3. 1B S6 while it computes
        d6 = _state_seconds(reference, "logs/jobs/1B/s6/*/*.log", "1B.S6")
        kills.append(_kill_mid_state(root, log, "logs/jobs/1B/s6/*/*.log", "1B.S6", min(1.0, d6 / 3),
                                     extra=["--rerun-incomplete"]))
        subprocess.run(_cmd(root, ["--unlock"]), env=_env(), capture_output=True, text=True, timeout=300, check=True)

        # 4. finish
        final = _start(root, log, ["--rerun-incomplete"])
        rc = final.wait(timeout=900)
        assert rc == 0, f"the rerun after the kills failed ({rc}):\n{log.read_text()[-6000:]}"
    finally:
        watcher.stop.set()
        watcher.join(timeout=60)

    print(f"kills: {kills}; watcher scans: {watcher.scans}; empty bundle dirs seen while S9 ran: "
          f"{sorted(watcher.empty_bundle_dirs)}")
    assert watcher.scans > 10
    assert not watcher.problems, "partial partitions were visible:\n" + "\n".join(watcher.problems[:20])

    ref, ref_hidden = digest(reference)
    got, hidden = digest(root)
    assert not ref_hidden
    assert sorted(got) == sorted(ref), (sorted(set(got) ^ set(ref))[:10])
    diff = [k for k in ref if got[k] != ref[k]]
    assert not diff, diff[:10]
    flags = [k for k in got if "/validation/" in k and k.endswith("/_passed.flag")]
    assert len(flags) == 2, flags  # both segments passed their gate after the kills

    # RNG logs: the killed attempts left no rows behind (same events, trace and audit as the
    # uninterrupted run once ts_utc is removed)
    ref_logs, got_logs = rng_logs_without_ts(reference), rng_logs_without_ts(root)
    assert sorted(got_logs) == sorted(ref_logs), sorted(set(got_logs) ^ set(ref_logs))[:10]
    bad = [k for k in ref_logs if got_logs[k] != ref_logs[k]]
    assert not bad, bad[:10]

    # staging leftovers of the killed attempts: the rerun's publish of the same partition sweeps them
    # (their writers' flocks died with them), so none remain
    assert not hidden, "stale staging entries left by the killed attempts:\n  " + "\n  ".join(hidden)


def test_watcher_flags_partial_partitions_and_ignores_staging(tmp_path):
    """The watcher itself can fail: a torn Parquet file, an empty partition and a bundle without
    index.json are reported; a `_tmp.*` staging dir full of garbage is not."""
    import pyarrow as pa

    fp = "f" * 64
    good = tmp_path / f"data/layer1/1A/sealed_inputs/fingerprint={fp}"
    good.mkdir(parents=True)
    pq.write_table(pa.table({"x": [1, 2, 3]}), good / "part-00000.parquet")
    w = Watcher(tmp_path)
    w.scan()
    assert w.problems == []

    torn = tmp_path / f"data/layer1/1A/s0_gate_receipt/fingerprint={fp}"
    torn.mkdir(parents=True)
    data = (good / "part-00000.parquet").read_bytes()
    (torn / "part-00000.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / f"data/layer1/1A/outlet_catalogue/seed=1/fingerprint={fp}").mkdir(parents=True)
    bundle = tmp_path / f"data/layer1/1B/validation/seed=1/fingerprint={fp}"
    bundle.mkdir(parents=True)
    (bundle / "s9_summary.json").write_text("{}")
    staging = tmp_path / f"data/layer1/1A/hurdle_pi_probs/parameter_hash={fp}/_tmp.fingerprint={fp}.00"
    staging.mkdir(parents=True)
    (staging / "part-00000.parquet").write_bytes(b"garbage")
    w = Watcher(tmp_path)
    w.scan()
    text = "\n".join(w.problems)
    assert "s0_gate_receipt" in text and "unreadable" in text
    assert "empty outlet_catalogue partition" in text
    assert "bundle without index.json" in text
    assert "hurdle_pi_probs" not in text
    assert len(w.problems) == 3, text
    empty_bundle = tmp_path / f"data/layer1/1A/validation/seed=1/fingerprint={fp}"
    empty_bundle.mkdir(parents=True)
    w = Watcher(tmp_path)
    w.scan()
    assert len(w.problems) == 3 and w.empty_bundle_dirs == {str(empty_bundle.relative_to(tmp_path))}

    got, leftovers = digest(tmp_path)
    assert leftovers == [str(staging.relative_to(tmp_path)) + "/"]
    assert not [k for k in got if "_tmp" in k]
