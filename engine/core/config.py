"""Run configuration: load, validate against `contracts/config.schema.json`, make paths absolute.

Relative input paths in a config are resolved against the repository root (where the embedded
defaults live); the CLIs turn a user's relative paths into absolute ones before they get here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from engine.core.dictionary import SAFE_LOADER
from engine.core.errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "contracts" / "config.schema.json"

_PATH_SECTIONS = (("segment1a", "inputs"), ("segment1a", "parameters"), ("segment1b", "inputs"), ("segment1b", "parameters"))


def load_yaml(path: str | Path) -> dict:
    try:
        with open(path, "rb") as f:
            return yaml.load(f, Loader=SAFE_LOADER) or {}
    except (OSError, yaml.YAMLError) as e:  # pragma: no cover - message only
        raise InputError("E_CONFIG_INVALID", f"cannot read config: {e}", path=path) from e


def validate(config: dict) -> None:
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    v = jsonschema.Draft202012Validator(schema)
    errs = sorted(v.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errs:
        rows = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errs]
        raise InputError("E_CONFIG_INVALID", "configuration does not match contracts/config.schema.json", rows=rows)


def resolve(config: dict, repo_root: Path = REPO_ROOT) -> dict:
    """Validated deep copy with every input/parameter path absolute (relative = under repo_root)."""
    validate(config)
    cfg = copy.deepcopy(config)
    for seg, sec in _PATH_SECTIONS:
        entries = cfg.get(seg, {}).get(sec, {}) or {}
        for k, v in list(entries.items()):
            p = Path(str(v))
            entries[k] = str(p if p.is_absolute() else (repo_root / p).resolve())
    d = cfg.get("segment1b", {}).get("dictionary")
    if d:
        p = Path(d)
        cfg["segment1b"]["dictionary"] = str(p if p.is_absolute() else (repo_root / p).resolve())
    return cfg


def load(path: str | Path | None = None, repo_root: Path = REPO_ROOT) -> dict:
    return resolve(load_yaml(path or repo_root / "config.yaml"), repo_root)


def write_run_config(path: str | Path, cfg: dict) -> None:
    """Keep the resolved configuration of a run (ops record under logs/, never hashed)."""
    path = Path(path)
    body = json.dumps(cfg, sort_keys=True, indent=1) + "\n"
    if path.exists() and path.read_text() == body:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(body)
    tmp.replace(path)


def read_run_config(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
