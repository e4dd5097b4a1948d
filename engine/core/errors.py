"""One error type per failure family, carrying the spec's code.

Every engine failure is an :class:`EngineError` with

* ``code``: the spec's named code (``E_INGRESS_SCHEMA``, ``E904_EGRESS_SCHEMA_VIOLATION`` ...),
* ``path``: the file (or partition) concerned, when there is one,
* ``rows``: a short list of offending rows / keys (first few only),
* ``detail``: a JSON-serialisable dict with anything else.

``str(err)`` renders all of it so the CLI can print it as is. Entry points catch
``EngineError``, print it to stderr and exit non-zero; nothing is published because
every writer stages into a temp dir first (see ``engine.core.publish``).
"""

from __future__ import annotations

import json
from typing import Any, Iterable

MAX_ROWS_SHOWN = 10


class EngineError(Exception):
    """Base class: a named failure of the engine."""

    family = "engine"

    def __init__(
        self,
        code: str,
        message: str,
        *,
        path: Any = None,
        rows: Iterable[Any] | None = None,
        detail: dict | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.path = None if path is None else str(path)
        self.rows = list(rows)[:MAX_ROWS_SHOWN] if rows is not None else []
        self.detail = detail or {}
        super().__init__(self.__str__())

    def __str__(self) -> str:  # pragma: no cover - formatting only
        parts = [f"{self.code}: {self.message}"]
        if self.path:
            parts.append(f"  file: {self.path}")
        if self.rows:
            parts.append("  offending rows/keys (first %d):" % len(self.rows))
            parts.extend(f"    {r}" for r in self.rows)
        if self.detail:
            parts.append("  detail: " + json.dumps(self.detail, sort_keys=True, default=str))
        return "\n".join(parts)

    def as_record(self) -> dict:
        return {
            "code": self.code,
            "message": self.message,
            "path": self.path,
            "rows": [str(r) for r in self.rows],
            "detail": self.detail,
        }


class InputError(EngineError):
    """Bad ingress data, reference table or policy file (F1/F3/S0 codes)."""

    family = "input"


class IdentityError(EngineError):
    """parameter_hash / manifest_fingerprint / run_id problems (F2)."""

    family = "identity"


class RngError(EngineError):
    """RNG envelope / counter / budget violations and sampler caps (F4)."""

    family = "rng"


class PublishError(EngineError):
    """Write-once / atomic publish violations (F10, E913)."""

    family = "publish"


class GateError(EngineError):
    """Consumer gate refusals: "No PASS -> no read" (decision 27)."""

    family = "gate"

    def __str__(self) -> str:  # message always starts with the runbook's words
        base = super().__str__()
        return base if base.startswith("No PASS -> no read:") else "No PASS -> no read: " + base


class ValidationFailure(EngineError):
    """A validator (S9) found failures; carries the list of failure codes in detail['failure_codes']."""

    family = "validation"


class ModelError(EngineError):
    """Numerically invalid model outputs, exhausted rejection caps, limits exceeded (decision 8)."""

    family = "model"
