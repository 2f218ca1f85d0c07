"""The import contracts in pyproject.toml ([tool.importlinter]) hold: app's packages depend
downwards only (api, state, service, engine, generation, lora, retrieval), none of those imports
app.training, and app.contracts and app.errors import no other app module.

It runs the same `lint-imports` as `make lint`, from the venv that runs the tests, so a broken
contract fails the test suite too, naming the contract and the import chain that breaks it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def test_import_contracts_are_kept() -> None:
    assert LINT_IMPORTS.exists(), f"{LINT_IMPORTS} is missing: install the dev extra (.[dev])"
    # no cache: the graph of ~90 modules builds in well under a second
    run = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = run.stdout + run.stderr
    broken = [
        line.removesuffix(" BROKEN") for line in report.splitlines() if line.endswith(" BROKEN")
    ]
    assert run.returncode == 0 and not broken, (
        f"broken import contracts: {broken or 'lint-imports failed'}\n\n{report}"
    )
    assert "0 broken" in report, report
