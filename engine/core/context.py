"""RunContext: everything a state needs to know about the run it belongs to.

A state module exposes ``run(ctx: RunContext) -> None``: load (validated), compute (pure,
vectorised), publish (atomic). Snakemake builds the context in ``scripts/run_state.py``
from the identities resolved at parse time; tests build it directly with
:func:`RunContext.create`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SegmentIds:
    """Identities of one segment's run (hex strings are lower-case, 64 hex; run_id 32 hex)."""

    segment: str  # "1A" or "1B"
    seed: int
    parameter_hash: str
    manifest_fingerprint: str
    run_id: str

    @property
    def parameter_hash_bytes(self) -> bytes:
        return bytes.fromhex(self.parameter_hash)

    @property
    def fingerprint_bytes(self) -> bytes:
        return bytes.fromhex(self.manifest_fingerprint)

    def tokens(self) -> dict[str, Any]:
        """Tokens for dictionary path templates."""
        return {
            "seed": self.seed,
            "parameter_hash": self.parameter_hash,
            "manifest_fingerprint": self.manifest_fingerprint,
            "run_id": self.run_id,
        }


@dataclass(frozen=True)
class RunContext:
    """Context of one state's execution.

    * ``data_root``: the folder holding ``data/`` and ``logs/`` (Snakemake's working directory).
    * ``repo_root``: the engine checkout (for ``contracts/`` and the embedded defaults).
    * ``config``: the run configuration (``config.yaml`` layout) with every input path absolute.
    * ``ids``: this segment's identities. For 1B, ``ids_1a`` holds the 1A identities it consumes.
    * ``extra``: additional tokens (1B ``grid_hash``, ``weights_hash``) and code provenance
      (``code_digest`` hex, ``git_commit`` or None).
    """

    data_root: Path
    repo_root: Path
    config: dict
    ids: SegmentIds
    ids_1a: SegmentIds | None = None
    extra: dict = field(default_factory=dict)

    @property
    def segment(self) -> str:
        return self.ids.segment

    def tokens(self) -> dict[str, Any]:
        t = dict(self.ids.tokens())
        t.update({k: v for k, v in self.extra.items() if k in ("grid_hash", "weights_hash")})
        return t

    def path(self, dataset_id: str, segment: str | None = None, **tokens: Any) -> Path:
        """Absolute path of a dataset partition (or file) from the dataset dictionary.

        Tokens default to this run's identities; pass e.g. ``family=`` for RNG event logs,
        or override ``seed=`` etc. The template itself lives only in ``contracts/``.
        """
        from engine.core import dictionary

        d = dictionary.load(segment or self.segment, self.config)
        toks = self.tokens()
        if (segment or self.segment) == "1A" and self.segment == "1B" and self.ids_1a is not None:
            toks = dict(self.ids_1a.tokens())
        toks.update(tokens)
        return self.data_root / d.path(dataset_id, **toks)


    def schema_path(self, dataset_id: str, segment: str | None = None) -> Path:
        """Absolute path of a dataset's JSON row schema, from the dataset dictionary's ``schema_ref`` (the one
        place a dataset's schema is named)."""
        from engine.core import dictionary

        return dictionary.load(segment or self.segment, self.config).schema_path(dataset_id)


def context_to_json(ctx: RunContext) -> str:
    """Serialise a context for a Snakemake job (one compact JSON string)."""
    import json

    def ids(i: SegmentIds | None):
        return None if i is None else {
            "segment": i.segment,
            "seed": i.seed,
            "parameter_hash": i.parameter_hash,
            "manifest_fingerprint": i.manifest_fingerprint,
            "run_id": i.run_id,
        }

    return json.dumps(
        {
            "data_root": str(ctx.data_root),
            "repo_root": str(ctx.repo_root),
            "config": ctx.config,
            "ids": ids(ctx.ids),
            "ids_1a": ids(ctx.ids_1a),
            "extra": ctx.extra,
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def context_from_json(text: str, data_root: Path | None = None) -> RunContext:
    import json

    d = json.loads(text)

    def ids(x):
        return None if x is None else SegmentIds(**x)

    return RunContext(
        data_root=Path(data_root if data_root is not None else d["data_root"]).resolve(),
        repo_root=Path(d["repo_root"]),
        config=d["config"],
        ids=ids(d["ids"]),
        ids_1a=ids(d.get("ids_1a")),
        extra=d.get("extra", {}),
    )
