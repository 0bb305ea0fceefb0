"""Where the tests find the repository, their fixtures and the seed paper's CSV."""

from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
FIXTURES = TESTS / "fixtures"
#: the seed paper's released step records, beside the checkout (tests skip when absent).
PAPER_CSV = ROOT.parent / "shared" / "paper" / "phase2_step_results.csv"
