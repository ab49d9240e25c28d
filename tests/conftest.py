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
