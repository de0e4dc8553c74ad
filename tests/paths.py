"""Where the tests find the repository's files, wherever in tests/ a test module lives."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
