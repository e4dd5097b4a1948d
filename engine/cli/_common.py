"""Helpers shared by the CLIs: build a config, run the Snakemake workflow, print JSON.

While the workflow runs, the CLIs show one progress line per state on stderr (issue 7), built from what
Snakemake prints about its jobs (a ``rule X:`` block when a job starts, ``Finished jobid: N`` when it ends)
and from the ``[progress]`` lines the states write to their job logs (:mod:`engine.core.progress`):

    [1B] S1 tile_index ... countries 120/249 (48.2%) 35.1/s elapsed 3.4s
    [1B] S1 tile_index ... done (1/24) 1,254,331 rows, 54,210.3 rows/s, elapsed 23.1s
    [1A] S2 nb_outlets ... done (5/24) elapsed 4.9s

Snakemake's own output is kept out of the way (its complete log is under ``.snakemake/log/``) and its tail
is printed when the run fails; ``verbose=True`` (the CLIs' ``--verbose``) passes it through as well.
Nothing here touches ``data/``: progress is read from logs and written to the terminal only.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TextIO

import yaml

from engine.core import config as engine_config

REPO = engine_config.REPO_ROOT

# rules that only gather targets: not states, not counted
AGGREGATE_RULES = frozenset({"all", "segment1a", "segment1b"})
POLL_S = 1.0  # how often running jobs' logs are read for [progress] lines
FAIL_TAIL = 80  # Snakemake lines shown when a run fails
JOB_LOG_TAIL = 15  # lines of a failed job's log shown

_RULE_RE = re.compile(r"^(?:local)?rule (\w+):$")
_FINISHED_RE = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$")
_ERROR_RE = re.compile(r"^Error in rule (\w+):$")
# engine.core.progress line format (stable: see its docstring)
PROGRESS_RE = re.compile(r"^\[progress\] (?P<state>\S+) (?P<unit>\S+) (?P<done>\d+)(?:/(?P<total>\d+) \([\d.]+%\))? "
                         r"(?P<rate>[\d,.]+)/s elapsed (?P<elapsed>[\d.]+)s(?P<final> done)?$")


def abspath(p: str | None) -> str | None:
    return None if p is None else str(Path(p).expanduser().resolve())


def default_config() -> dict:
    return engine_config.load_yaml(REPO / "config.yaml")


def state_label(rule: str) -> str:
    """``s1a_s2_nb_outlets`` -> ``[1A] S2 nb_outlets``; ``report_site_map`` -> ``[report] site_map``."""
    m = re.match(r"^s1([ab])_(s\d+)_?(.*)$", rule)
    if m:
        return f"[1{m.group(1).upper()}] {m.group(2).upper()} {m.group(3)}".rstrip()
    if rule.startswith("report_"):
        return f"[report] {rule[len('report_'):]}"
    return f"[{rule}]"


class _Job:
    __slots__ = ("rule", "jobid", "logs", "t0", "offset", "partial", "last_done")

    def __init__(self, rule: str):
        self.rule = rule
        self.jobid: str | None = None
        self.logs: list[str] = []
        self.t0 = time.monotonic()
        self.offset = 0
        self.partial = ""
        self.last_done: re.Match | None = None


class ProgressFollower:
    """Turns Snakemake's output (fed line by line) and the job logs into one progress line per state."""

    def __init__(self, data_root: Path, out: TextIO | None = None, verbose: bool = False):
        self.root = Path(data_root)
        self.out = out
        self.verbose = verbose
        self.lock = threading.Lock()
        self.total: int | None = None
        self.done = 0
        self.running: dict[str, _Job] = {}
        self.failed: list[_Job] = []
        self.tail: collections.deque[str] = collections.deque(maxlen=FAIL_TAIL)
        self._block: _Job | None = None
        self._error: _Job | None = None
        self._stats: dict[str, int] | None = None

    # ------------------------------------------------------------------ output
    def _print(self, text: str) -> None:
        print(text, file=self.out or sys.stderr, flush=True)

    def _count(self) -> str:
        return f"({self.done}/{self.total})" if self.total else f"({self.done})"

    # ------------------------------------------------------------------ Snakemake's output
    def feed(self, line: str) -> None:
        line = line.rstrip("\n")
        with self.lock:
            self.tail.append(line)
            if self.verbose:
                self._print(line)
            self._parse(line)

    def _parse(self, line: str) -> None:
        if self._stats is not None:  # inside the "Job stats:" table
            parts = line.split()
            if not line.strip():
                self.total = sum(n for r, n in self._stats.items() if r not in AGGREGATE_RULES) or None
                self._stats = None
            elif len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("job", "total"):
                self._stats[parts[0]] = int(parts[1])
            return
        if line == "Job stats:":
            self._stats = {}
            return
        for blk in (self._block, self._error):
            if blk is not None and line.startswith("    "):
                key, _, value = line.strip().partition(": ")
                if key == "jobid":
                    blk.jobid = value.strip()
                elif key == "log":
                    # "log: a.log, b.log" in a start block; "log: a.log (check log file(s) ...)" in an error block
                    value = value.split(" (check log", 1)[0]
                    blk.logs = [v.strip() for v in value.split(", ") if v.strip()]
                return
        self._flush_pending()
        m = _RULE_RE.match(line)
        if m:
            self._block = _Job(m.group(1))
            return
        m = _ERROR_RE.match(line)
        if m:
            self._error = _Job(m.group(1))
            return
        m = _FINISHED_RE.match(line)
        if m:
            self._finish(m.group(1), m.group(2))
            return
        if line.startswith("Nothing to be done"):
            self._print("[engine] nothing to do: every output is present and up to date")

    def _start(self, job: _Job) -> None:
        if job.rule in AGGREGATE_RULES or job.jobid is None:
            return
        self.running[job.jobid] = job

    def _finish(self, jobid: str, rule: str) -> None:
        job = self.running.pop(jobid, None)
        if rule in AGGREGATE_RULES:
            return
        self.done += 1
        if job is None:
            job = _Job(rule)
        self._read_log(job, forward=False)
        m = job.last_done
        wall = time.monotonic() - job.t0
        if m is not None and m.group("unit") != "state":
            unit = m.group("unit")
            detail = (f"{int(m.group('done')):,} {unit}, {m.group('rate')} {unit}/s, "
                      f"elapsed {m.group('elapsed')}s")
        elif m is not None:
            detail = f"elapsed {m.group('elapsed')}s"
        else:
            detail = f"elapsed {wall:.1f}s"
        self._print(f"{state_label(rule)} ... done {self._count()} {detail}")

    def _fail(self, err: _Job) -> None:
        job = self.running.pop(err.jobid, None) if err.jobid else None
        logs = err.logs or (job.logs if job else [])
        where = f" (log: {', '.join(logs)})" if logs else ""
        self._print(f"{state_label(err.rule)} ... FAILED{where}")
        err.logs = logs
        self.failed.append(err)

    # ------------------------------------------------------------------ job logs
    def _read_log(self, job: _Job, forward: bool) -> None:
        """New complete lines of the job's log: remember the last final [progress] line, print the others."""
        if not job.logs:
            return
        path = self.root / job.logs[0]
        try:
            with open(path, "rb") as f:
                f.seek(job.offset)
                chunk = f.read()
        except OSError:
            return
        job.offset += len(chunk)
        text = job.partial + chunk.decode("utf-8", errors="replace")
        lines = text.split("\n")
        job.partial = lines.pop()  # an unfinished last line waits for the next read
        for ln in lines:
            m = PROGRESS_RE.match(ln.strip())
            if m is None:
                continue
            if m.group("final"):
                job.last_done = m
            elif forward:
                self._print(f"{state_label(job.rule)} ... {ln.strip()[len('[progress] ') + len(m.group('state')) + 1:]}")

    def _flush_pending(self) -> None:
        """A rule/error block of Snakemake's output ends at the first line that is not indented (or at exit)."""
        if self._block is not None:
            self._start(self._block)
            self._block = None
        if self._error is not None:
            self._fail(self._error)
            self._error = None

    def poll(self) -> None:
        with self.lock:
            for jobid in sorted(self.running):
                self._read_log(self.running[jobid], forward=True)

    # ------------------------------------------------------------------ end of run
    def close(self, returncode: int) -> None:
        with self.lock:
            self._flush_pending()
            if returncode == 0 or self.verbose:
                return
            self._print(f"[engine] the workflow failed (exit {returncode}); last lines of Snakemake's output:")
            for ln in self.tail:
                self._print(f"  {ln}")
            for job in self.failed:
                for log in job.logs[:1]:
                    try:
                        lines = (self.root / log).read_text(errors="replace").splitlines()[-JOB_LOG_TAIL:]
                    except OSError:
                        continue
                    self._print(f"[engine] {log} (last lines):")
                    for ln in lines:
                        self._print(f"  {ln}")


def _follow(proc: subprocess.Popen, follower: ProgressFollower) -> int:
    stop = threading.Event()

    def poller() -> None:
        while not stop.wait(POLL_S):
            follower.poll()

    t = threading.Thread(target=poller, name="engine-progress", daemon=True)
    t.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            follower.feed(line)
        rc = proc.wait()
    except BaseException:
        # Ctrl-C reaches Snakemake too (same process group): let it stop its jobs (reading its output so it
        # cannot block on a full pipe), then give up
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    finally:
        stop.set()
        t.join()
    follower.close(rc)
    return rc


def run_snakemake(data_root: Path, cfg: dict, targets: list[str], cores: int, extra_args: list[str] | None = None,
                  quiet: bool = False, verbose: bool = False) -> int:
    """Run the one workflow (the same code path as `snakemake --cores N`) into data_root.

    Shows one progress line per state on stderr (``quiet``: nothing; ``verbose``: Snakemake's own output too;
    a dry run ``-n`` prints Snakemake's job list as it is).
    """
    data_root.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="engine-config-", delete=False) as f:
        yaml.safe_dump(cfg, f, sort_keys=True)
        cfg_path = f.name
    # targets first: --configfile and --rerun-triggers take several values each
    cmd = [
        sys.executable, "-m", "snakemake",
        *targets,
        "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(data_root),
        "--configfile", cfg_path,
        "--cores", str(cores),
        "--rerun-triggers", "mtime",
        *(extra_args or []),
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    dry_run = any(a in ("-n", "--dry-run", "--dryrun") for a in (extra_args or []))
    try:
        if quiet or dry_run:
            sink = subprocess.DEVNULL if quiet else sys.stderr
            return subprocess.run(cmd, env=env, stdout=sink, stderr=sink).returncode
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                encoding="utf-8", errors="replace", bufsize=1)
        return _follow(proc, ProgressFollower(data_root, verbose=verbose))
    finally:
        os.unlink(cfg_path)


def print_json(obj: dict) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))
