"""Shared test helpers."""

import pytest

from run_analysis import main


@pytest.fixture
def cli_error(capsys):
    """Run the CLI on argv, expect exit 2 and return its one error line (progress lines "[ 1.2 s] …" may precede it)."""
    def run(argv: list[str]) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err
        lines = [ln for ln in err.strip().splitlines() if not ln.startswith("[")]
        assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
        return lines[0]
    return run


@pytest.fixture(scope="session")
def tiny_grid(tmp_path_factory):
    """A finished init sweep folder: pre and post, L = 2 and 4, 3 seeds, width 16 (seconds)."""
    grid = tmp_path_factory.mktemp("tiny_grid") / "grid"
    assert main(["sweep", "--schemes", "pre,post", "--depths", "2,4", "--seeds", "0,1,2",
                 "--width", "16", "--heads", "2", "--seq-len", "8", "--batch", "2",
                 "--batches", "1", "--out", str(grid), "--quiet"]) == 0
    return grid
