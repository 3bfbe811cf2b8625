"""The README's main job runs, every block it loads is bit-identical to prefill's, and a restart loads from disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvbm_fs.cli import main


def test_demo_runs_and_loads_bit_exact_blocks(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["demo", "--requests", "6", "--json", "--dir", str(tmp_path)]) == 0
    s = json.loads(capsys.readouterr().out)
    first, again = s["serve"], s["after_restart"]
    assert first["loaded_blocks_bit_exact"] and again["loaded_blocks_bit_exact"]
    assert first["blocks_loaded"] > 0 and first["blocks_computed"] > 0
    assert first["store"]["get_misses"] == 0
    # after the restart, G1/G2 start empty and everything the first run saw loads from disk
    assert again["blocks_computed"] == 0
    assert set(again["hits_by_tier"]) == {"disk"}


def test_cli_reports_config_errors_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--tiers", "bogus://x"]) == 2
    assert "unknown tier scheme 'bogus'" in capsys.readouterr().err
