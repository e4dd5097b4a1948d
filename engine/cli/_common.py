"""Helpers shared by the CLIs: build a config, run the Snakemake workflow, print JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from engine.core import config as engine_config

REPO = engine_config.REPO_ROOT


def abspath(p: str | None) -> str | None:
    return None if p is None else str(Path(p).expanduser().resolve())


def default_config() -> dict:
    return engine_config.load_yaml(REPO / "config.yaml")


def run_snakemake(data_root: Path, cfg: dict, targets: list[str], cores: int, extra_args: list[str] | None = None,
                  quiet: bool = False) -> int:
    """Run the one workflow (the same code path as `snakemake --cores N`) into data_root."""
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
    try:
        proc = subprocess.run(cmd, env=env, stdout=sys.stderr if not quiet else subprocess.DEVNULL,
                              stderr=sys.stderr if not quiet else subprocess.DEVNULL)
        return proc.returncode
    finally:
        os.unlink(cfg_path)


def print_json(obj: dict) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))
