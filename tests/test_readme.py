"""The README's contract: its configuration tables match the settings, its commands exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_tables_are_current() -> None:
    generated = subprocess.run(
        [sys.executable, "scripts/settings_table.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT)},
    ).stdout.strip()
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- settings:begin -->")[1].split("<!-- settings:end -->")[0]
    assert block.strip() == generated, "run: python scripts/settings_table.py --write"


def test_quickstart_commands_are_make_targets() -> None:
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"^make (\w[\w-]*)", readme, flags=re.M):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
    assert "make test" in (ROOT / ".ci" / "run").read_text()
