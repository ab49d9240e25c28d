"""The one claims table every producer writes: its columns, extra qualifiers, and the tally."""

import pytest

from theory.claim_table import COLUMNS, Claim, claims_frame, tally


def test_the_table_always_has_the_six_columns_in_order_and_extras_after_scheme():
    assert list(claims_frame([]).columns) == COLUMNS
    rows = [Claim("a", "pre", "s", "measured", "holds", "e", {"optimizer": "adam"}),
            {"claim": "b", "scheme": "post", "statement": "t", "method": "m", "status": "fails",
             "evidence": "", "optimizer": "sgd"}]
    frame = claims_frame(rows)
    assert list(frame.columns) == ["claim", "scheme", "optimizer", *COLUMNS[2:]]
    assert list(frame["optimizer"]) == ["adam", "sgd"]


def test_a_bad_row_is_refused():
    with pytest.raises(ValueError, match="status"):
        claims_frame([Claim("a", "pre", "s", "m", "maybe")])
    with pytest.raises(ValueError, match="lacks method"):
        claims_frame([{"claim": "a", "scheme": "pre", "statement": "s", "status": "holds",
                       "evidence": ""}])
    with pytest.raises(ValueError, match="extra"):
        Claim("a", "pre", "s", "m", extra={"status": "holds"})


def test_tally_counts_and_the_summary_line():
    claims = [Claim("a", "pre", "s", "m", "holds"), Claim("b", "pre", "s", "m", "fails"),
              Claim("c", "pre", "s", "m"), Claim("d", "pre", "s", "m", "holds")]
    assert tally(claims) == (2, 1, 1) == tally(claims_frame(claims))
    assert tally(claims).line() == "claims: 2 hold, 1 fail, 1 untested"
    assert tally(claims_frame([])).line("claims after training") == \
        "claims after training: 0 hold, 0 fail, 0 untested"
