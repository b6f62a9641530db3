"""What a prompt load found: rows read, rows kept, and every malformed row with file and line.

Malformed rows are never dropped silently. In strict mode the loader raises a `MilesError` that
lists them; in skip mode it keeps going and returns them here, so the caller (and the stage's
metrics) can report how many were skipped and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from miles_core.errors import MilesError

__all__ = ["LoadReport", "RowError"]


@dataclass(frozen=True)
class RowError:
    """One malformed row: `line` is 1-based (the JSONL line, or the Parquet row number)."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@dataclass
class LoadReport:
    """Counts of one load; `malformed` keeps every bad row, in file order."""

    source: str
    n_rows: int = 0
    n_loaded: int = 0
    malformed: list[RowError] = field(default_factory=list)

    @property
    def n_malformed(self) -> int:
        return len(self.malformed)

    def merge(self, other: LoadReport) -> None:
        """Add another file's counts to this one (directory sources)."""
        self.n_rows += other.n_rows
        self.n_loaded += other.n_loaded
        self.malformed.extend(other.malformed)

    def summary(self) -> str:
        loaded = f"{self.n_loaded} prompts loaded"
        return f"{self.source}: {loaded}, {self.n_malformed} malformed of {self.n_rows} rows"

    def raise_if_malformed(self, limit: int = 5) -> None:
        """Raise one `MilesError` naming the first `limit` malformed rows (strict mode)."""
        if not self.malformed:
            return
        shown = "; ".join(str(e) for e in self.malformed[:limit])
        more = f" (and {self.n_malformed - limit} more)" if self.n_malformed > limit else ""
        raise MilesError(
            f"{self.n_malformed} malformed prompt row(s) in {self.source}: {shown}{more}; "
            "fix them or load with strict=False to skip and count them"
        )
