"""The rooms' import rules (ARCHITECTURE.md "What may import what"), as import-linter contracts in
pyproject.toml: a lower room never imports a higher one, and the shared base none of them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept() -> None:
    linter = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(linter), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout, done.stdout


def test_a_broken_layer_is_reported(tmp_path: Path) -> None:
    """The contracts can fail: the same check on a copy of the package in which the ledger
    imports the proxy reports it broken."""
    shutil.copytree(ROOT / "app", tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    contract = tmp_path / "app" / "ledger" / "contract.py"
    contract.write_text(contract.read_text() + "\nimport app.proxy.service  # noqa\n")
    linter = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(linter), "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode != 0, done.stdout
    assert "app.ledger is not allowed to import app.proxy" in done.stdout, done.stdout
