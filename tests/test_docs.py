"""The README documents every setting, and its two commands are the Makefile's."""

from __future__ import annotations

import re
from pathlib import Path

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_is_in_the_readme_table() -> None:
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"`(LORAG_[A-Z0-9_]+)`", readme))
    expected = {f"LORAG_{name.upper()}" for name in Settings.model_fields}
    assert expected - documented == set(), "settings missing from README.md"
    assert documented - expected == set(), "README.md names settings that do not exist"


def test_readme_commands_exist_in_the_makefile() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target in ("serve", "test", "image", "image-test"):
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), target
