"""The claims table, shared by every producer of a claims.csv: one ``Claim`` record, its columns,
the table made from records, and the "claims: N hold, N fail, N untested" tally.

Producers: theory's claims (theory.claims), the init claims measured across depths
(analysis.init.measured_claims, joined in analysis.init.pipeline), the training claims
(analysis.training.claims), the width claims (analysis.width.coordcheck, lrsweep, onestep) and the
atlas (analysis.diagnose.atlas). Here, under theory/, so that theory and analysis both import it
(analysis → theory, never back); no torch, and pandas only when a table is made.

A claim's ``status`` is holds | fails | untested: a claim whose data are missing is 'untested',
never dropped. ``method`` says how the verdict was reached (e.g. "theory, symbolic", "measured
after training", "measured at the first steps").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, NamedTuple

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ["claim", "scheme", "statement", "method", "status", "evidence"]
STATUSES = ("holds", "fails", "untested")


@dataclass
class Claim:
    """One checkable statement and its outcome. ``extra``: qualifying columns of a producer's own
    (a width claim's parametrization and optimizer, onestep's fitted slope), placed after
    ``scheme`` in the table; never one of COLUMNS."""

    claim: str
    scheme: str
    statement: str
    method: str
    status: str = "untested"
    evidence: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clash = sorted(set(self.extra) & set(COLUMNS))
        if clash:
            raise ValueError(f"claim {self.claim}: extra columns {clash} are claims-table columns")

    def as_row(self) -> dict[str, Any]:
        """A flat dict in table order: claim, scheme, the extra columns, then statement, method,
        status, evidence (for claims.csv and theory.json)."""
        return {"claim": self.claim, "scheme": self.scheme, **self.extra,
                "statement": self.statement, "method": self.method, "status": self.status,
                "evidence": self.evidence}


def claims_frame(records: Iterable[Claim | Mapping[str, Any]]) -> pd.DataFrame:
    """The claims table of ``records`` (Claim, or a mapping with the COLUMNS and maybe extra
    keys): every one of COLUMNS, in order, even with no records; a status outside STATUSES is a
    ValueError. Extra columns (the same for every record) stand after ``scheme``."""
    import pandas as pd

    rows = [r.as_row() if isinstance(r, Claim) else dict(r) for r in records]
    extra: list[str] = []
    for row in rows:
        lacking = [c for c in COLUMNS if c not in row]
        if lacking:
            raise ValueError(f"claim {row.get('claim')!r} lacks {', '.join(lacking)}")
        if row["status"] not in STATUSES:
            raise ValueError(f"claim {row['claim']!r}: status {row['status']!r} is not one of "
                             f"{', '.join(STATUSES)}")
        extra += [k for k in row if k not in COLUMNS and k not in extra]
    return pd.DataFrame(rows, columns=COLUMNS[:2] + extra + COLUMNS[2:])


class Tally(NamedTuple):
    """How many claims hold, fail, and are untested."""

    holds: int
    fails: int
    untested: int

    def line(self, what: str = "claims") -> str:
        """``claims: 3 hold, 1 fail, 2 untested``."""
        return f"{what}: {self.holds} hold, {self.fails} fail, {self.untested} untested"


def tally(claims: pd.DataFrame | Iterable[Claim]) -> Tally:
    """The counts of a claims table (or of Claim records) by status; ``.line()`` the summary line."""
    statuses = (list(claims["status"]) if hasattr(claims, "columns")
                else [c.status for c in claims])
    return Tally(*(statuses.count(s) for s in STATUSES))
