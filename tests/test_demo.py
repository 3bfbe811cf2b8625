"""The README's main job runs, and every block it loads is bit-identical to prefill's."""

from __future__ import annotations

import json

import pytest

from kvbm_fs.cli import main


def test_demo_runs_and_loads_bit_exact_blocks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--requests", "6", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["loaded_blocks_bit_exact"] is True
    assert summary["blocks_loaded"] > 0 and summary["blocks_computed"] > 0
    assert set(summary["hits_by_tier"]) <= {"gpu", "host"}
    assert summary["store"]["get_misses"] == 0


def test_cli_reports_config_errors_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--tiers", "bogus://x"]) == 2
    assert "unknown tier scheme 'bogus'" in capsys.readouterr().err
