"""Progress reporting (issue 7): the [progress] line format and throttling, the CLIs' one line per state, and the
progress lines long states leave in their Snakemake job logs."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine.cli._common import PROGRESS_RE, ProgressFollower, state_label
from engine.core import progress as progress_mod
from engine.core.progress import Progress, report
from workflow_helpers import REPO, default_config, small_table_s2_policy, snakemake


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(progress_mod.time, "monotonic", c)
    return c


# ---------------------------------------------------------------------------------------------- Progress
def test_progress_lines_are_throttled_and_end_with_one_done_line(clock):
    out = io.StringIO()
    p = Progress("1B.S1", total=250, unit="countries", every_s=2.0, stream=out)
    for _ in range(8):  # within the first 2 s: silent
        clock.t += 0.125
        p.advance(1)
    assert out.getvalue() == ""
    clock.t += 1.0  # 2.0 s since the start
    p.advance(10)
    clock.t += 0.5  # 0.5 s since the last line: silent
    p.advance(5)
    clock.t += 3.5
    p.advance(100)
    p.finish()
    lines = out.getvalue().splitlines()
    assert lines == [
        "[progress] 1B.S1 countries 18/250 (7.2%) 9.0/s elapsed 2.0s",
        "[progress] 1B.S1 countries 123/250 (49.2%) 20.5/s elapsed 6.0s",
        "[progress] 1B.S1 countries 123/250 (49.2%) 20.5/s elapsed 6.0s done",
    ]
    # the CLI parses exactly this format
    m = [PROGRESS_RE.match(ln) for ln in lines]
    assert all(m) and [x.group("final") for x in m] == [None, None, " done"]
    assert (m[1].group("state"), m[1].group("unit"), m[1].group("done"), m[1].group("total")) == \
        ("1B.S1", "countries", "123", "250")


def test_finish_with_a_count_and_without_a_total(clock):
    out = io.StringIO()
    p = Progress("1A.S8", unit="rows", stream=out)
    clock.t += 4.0
    p.finish(done=12_000)
    assert out.getvalue() == "[progress] 1A.S8 rows 12000 3,000.0/s elapsed 4.0s done\n"
    assert PROGRESS_RE.match(out.getvalue().strip()).group("total") is None


def test_report_uses_the_given_elapsed_time(clock):
    out = io.StringIO()
    report("1A.S2", 600, unit="rows", elapsed_s=1.5, stream=out)
    assert out.getvalue() == "[progress] 1A.S2 rows 600/600 (100.0%) 400.0/s elapsed 1.5s done\n"
    out = io.StringIO()
    report("1A.S1", 1, unit="state", elapsed_s=0.5, stream=out)
    assert out.getvalue() == "[progress] 1A.S1 state 1/1 (100.0%) 2.0/s elapsed 0.5s done\n"


def test_progress_goes_to_stderr_by_default(capsys):
    Progress("X", total=1, unit="rows").finish(1)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("[progress] X rows 1/1 (100.0%)")


# ---------------------------------------------------------------------------------------------- run_state
def _run_state_module():
    spec = importlib.util.spec_from_file_location("run_state", REPO / "scripts" / "run_state.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_run_state_counts_rows_from_a_returned_report_or_the_state_partitions(tmp_path):
    rs = _run_state_module()
    assert rs.rows_written("1B.S1", None, {"rows_emitted": 1234, "countries_total": 3}) == 1234
    assert rs.rows_written("1B.S2", None, 77) == 77

    # no count returned: the rows of the Parquet partitions the dictionary says the state produces
    from engine.core import config as engine_config
    from engine.core.context import RunContext, SegmentIds

    ids = SegmentIds("1A", 7, "a" * 64, "b" * 64, "c" * 32)
    ctx = RunContext(tmp_path, REPO, engine_config.resolve(default_config(), REPO), ids)
    assert rs.rows_written("1A.S8", ctx, None) is None  # nothing written yet
    part = ctx.path("outlet_catalogue")
    part.mkdir(parents=True)
    import pyarrow as pa

    pq.write_table(pa.table({"x": list(range(5))}), part / "part-00000.parquet")
    pq.write_table(pa.table({"x": list(range(3))}), part / "part-00001.parquet")
    assert rs.rows_written("1A.S8", ctx, None) == 8
    assert rs.rows_written("1A.S1", ctx, None) is None  # RNG logs only: no Parquet partition
    assert rs.rows_written("1A.S0.anchor", ctx, None) is None


# ---------------------------------------------------------------------------------------------- CLI follower
TRANSCRIPT = """\
Building DAG of jobs...
Job stats:
job                  count
-----------------  -------
s1a_s1_hurdle            1
s1b_s1_tile_index        1
report_site_map          1
all                      1
total                    4

Select jobs to execute...
Execute 2 jobs...

[Fri Nov 27 05:29:43 2026]
localrule s1b_s1_tile_index:
    input: a.gpkg, b.tif
    output: data/layer1/1B/tile_index/grid=1, data/layer1/1B/tile_bounds/grid=1
    log: logs/jobs/1B/s1/grid=1.log
    jobid: 20
    threads: 2
    resources: tmpdir=/tmp

[Fri Nov 27 05:29:43 2026]
localrule s1a_s1_hurdle:
    input: x
    output: logs/states/1A/s1/done
    log: logs/jobs/1A/s1.log
    jobid: 3
    resources: tmpdir=/tmp
"""
TRANSCRIPT_END = """\
[Fri Nov 27 05:30:06 2026]
Finished jobid: 20 (Rule: s1b_s1_tile_index)
1 of 4 steps (25%) done
Error in rule s1a_s1_hurdle:
    message: None
    jobid: 3
    output: logs/states/1A/s1/done
    log: logs/jobs/1A/s1.log (check log file(s) for error details)
    shell:
        python run_state.py 1A.S1 '{}' 2> logs/jobs/1A/s1.log
        (command exited with non-zero exit code)

[Fri Nov 27 05:30:07 2026]
localrule report_site_map:
    input: y
    output: reports/site_map.png
    log: logs/jobs/report/site_map.log
    jobid: 7
    resources: tmpdir=/tmp
[Fri Nov 27 05:30:09 2026]
Finished jobid: 7 (Rule: report_site_map)
2 of 4 steps (50%) done
Exiting because a job execution failed. Look below for error messages
"""


def test_follower_prints_one_line_per_state_progress_and_failures(tmp_path):
    s1_log = tmp_path / "logs/jobs/1B/s1/grid=1.log"
    a1_log = tmp_path / "logs/jobs/1A/s1.log"
    s1_log.parent.mkdir(parents=True)
    a1_log.parent.mkdir(parents=True)
    out = io.StringIO()
    f = ProgressFollower(tmp_path, out=out)
    for line in TRANSCRIPT.splitlines(keepends=True):
        f.feed(line)
    assert out.getvalue() == ""  # Snakemake's own lines are not shown
    s1_log.write_text("[1B.S1] start (seed=1)\n[progress] 1B.S1 countries 120/249 (48.2%) 35.1/s elapsed 3.4s\n"
                      "[progress] 1B.S1 countries 2")  # a line still being written is not read yet
    a1_log.write_text("[1A.S1] start\n")
    f.poll()
    assert out.getvalue() == "[1B] S1 tile_index ... countries 120/249 (48.2%) 35.1/s elapsed 3.4s\n"
    with open(s1_log, "a") as fh:
        fh.write("49/249 (100.0%) 40.3/s elapsed 6.2s done\n[1B.S1] 1000 tiles\n"
                 "[progress] 1B.S1 rows 1000/1000 (100.0%) 150.2/s elapsed 6.7s done\n[1B.S1] done in 6.70s\n")
    with open(a1_log, "a") as fh:
        fh.write("[1A.S1] FAILED\nE_SOMETHING: bad merchant\n")
    for line in TRANSCRIPT_END.splitlines(keepends=True):
        f.feed(line)
    f.close(1)
    lines = out.getvalue().splitlines()
    assert lines[1] == "[1B] S1 tile_index ... done (1/3) 1,000 rows, 150.2 rows/s, elapsed 6.7s"
    assert lines[2] == "[1A] S1 hurdle ... FAILED (log: logs/jobs/1A/s1.log)"
    assert re.fullmatch(r"\[report\] site_map \.\.\. done \(2/3\) elapsed \d+\.\ds", lines[3])
    # the failure shows Snakemake's last lines and the failed job's log
    text = out.getvalue()
    assert "the workflow failed (exit 1)" in text and "Exiting because a job execution failed" in text
    assert "E_SOMETHING: bad merchant" in text
    # intermediate [progress] lines of a job are shown once, its final ones not
    assert text.count("countries 120/249") == 1 and "countries 249/249" not in text


def test_state_labels():
    assert state_label("s1a_s3_candidates") == "[1A] S3 candidates"
    assert state_label("s1b_s0_rng_anchor") == "[1B] S0 rng_anchor"
    assert state_label("report_1a_figures") == "[report] 1a_figures"
    assert state_label("other") == "[other]"


def test_follower_says_when_nothing_is_to_be_done(tmp_path):
    out = io.StringIO()
    f = ProgressFollower(tmp_path, out=out)
    f.feed("Building DAG of jobs...\n")
    f.feed("Nothing to be done (all requested files are present and up to date).\n")
    f.close(0)
    assert out.getvalue().startswith("[engine] nothing to do")


# ---------------------------------------------------------------------------------------------- real runs
E2E_MERCHANTS = 3000  # the default seed on the first 3,000 merchants passes 1A's checks (test_cli_segment1b)
STATES_1A = ["s1a_s0_foundations", "s1a_s0_rng_anchor", "s1a_s1_hurdle", "s1a_s2_nb_outlets", "s1a_s3_candidates",
             "s1a_s4_ztp", "s1a_s5_currency_weights", "s1a_s6_foreign_selection", "s1a_s7_allocation",
             "s1a_s8_outlet_catalogue", "s1a_s9_validation"]


@pytest.mark.slow
def test_segment1a_cli_shows_one_progress_line_per_state_and_keeps_its_json(tmp_path):
    cfg = default_config()
    small = tmp_path / "merchants.parquet"
    pq.write_table(pq.read_table(REPO / cfg["segment1a"]["inputs"]["merchant_table"]).slice(0, E2E_MERCHANTS), small)
    root = tmp_path / "root"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "engine.cli.segment1a", "--output-dir", str(root),
                           "--merchant-table", str(small), "--cores", "2",
                           "--validation-policy", str(small_table_s2_policy(tmp_path))],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = json.loads(proc.stdout)  # stdout is the JSON and nothing else
    assert out["passed"] is True and out["exit_code"] == 0
    done = re.findall(r"^(\[1A\] S\d+ \w+) \.\.\. done \((\d+)/(\d+)\) (.*)$", proc.stderr, flags=re.M)
    labels = [d[0] for d in done]
    assert sorted(labels) == sorted(state_label(r) for r in STATES_1A), proc.stderr[-3000:]
    n = len(STATES_1A)
    assert [int(d[1]) for d in done] == list(range(1, n + 1)) and {int(d[2]) for d in done} == {n}
    by_label = dict((d[0], d[3]) for d in done)
    # S8 writes the catalogue: its line counts the catalogue's rows
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in Path(out["outlet_catalogue"]).glob("*.parquet"))
    assert by_label["[1A] S8 outlet_catalogue"].startswith(f"{rows:,} rows, ")
    assert re.fullmatch(r"elapsed \d+\.\ds", by_label["[1A] S1 hurdle"])  # RNG logs only: a plain done line
    # every state's job log ends with its final [progress] line
    for log in sorted((root / "logs" / "jobs" / "1A").rglob("*.log")):
        finals = [ln for ln in log.read_text().splitlines() if PROGRESS_RE.match(ln) and ln.endswith(" done")]
        assert finals, log
    # Snakemake's own chatter stays out of the CLI's stderr on success
    assert "Job stats" not in proc.stderr and "localrule" not in proc.stderr


@pytest.mark.slow
def test_1b_s1_job_log_reports_countries(tmp_path):
    root = tmp_path / "root"
    from engine.core import config as engine_config
    from engine.core import dictionary, identities

    cfg = engine_config.resolve(default_config(), REPO)
    r1a = identities.resolve_1a(cfg, REPO, None)
    r1b = identities.resolve_1b(cfg, REPO, r1a, None)
    target = dictionary.load("1B", cfg).path("tile_index", grid_hash=r1b.grid_hash).rstrip("/")
    snakemake(root, targets=[target], cores=2)
    log = root / f"logs/jobs/1B/s1/grid={r1b.grid_hash}.log"
    text = log.read_text()
    n = len(list((root / target).glob("part-*.parquet")))
    assert n > 100
    m = re.search(rf"^\[progress\] 1B\.S1 countries {n}/{n} \(100\.0%\) [\d,.]+/s elapsed [\d.]+s done$", text,
                  flags=re.M)
    assert m, text[-2000:]
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in (root / target).glob("part-*.parquet"))
    assert re.search(rf"^\[progress\] 1B\.S1 rows {rows}/{rows} \(100\.0%\) ", text, flags=re.M), text[-2000:]
