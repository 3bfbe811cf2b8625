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
    # G1 and G2 overflowed while serving: the daemon moved their coldest blocks down, nothing was lost
    assert first["blocks_demoted"] > 0 and first["store"]["tiers"][2]["blocks"] > 0
    # after the restart, G1/G2 start empty: everything the first run saw loads (from disk first, then
    # from the tiers the daemon promoted it to), nothing is computed
    assert again["blocks_computed"] == 0
    assert again["hits_by_tier"]["disk"] > 0 and sum(again["hits_by_tier"].values()) == again["blocks_loaded"]
    assert again["blocks_promoted"] > 0 and set(again["hits_by_tier"]) > {"disk"}
    # a real transformers model: the prefix loads from disk after a restart, outputs equal a full prefill
    m = s["model"]
    assert m["outputs_match_full_prefill"] and m["loaded_tokens"] == 144 and m["computed_tokens"] == 36


def test_cli_reports_config_errors_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--tiers", "bogus://x"]) == 2
    assert "unknown tier scheme 'bogus'" in capsys.readouterr().err


def test_check_command_verifies_a_disk_tier(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["demo", "--requests", "3", "--json", "--dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["check", f"file://{tmp_path}/disk", "--deep"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["entries"] > 0 and report["bad"] == 0
    seg = next((tmp_path / "disk" / "seg").rglob("*.seg"))
    with open(seg, "r+b") as f:  # flip a payload byte of the first slot behind the store's back
        f.seek(4096 + 10)
        b = f.read(1)
        f.seek(4096 + 10)
        f.write(bytes([b[0] ^ 0xFF]))
    assert main(["check", f"file://{tmp_path}/disk", "--deep"]) == 1
    assert json.loads(capsys.readouterr().out)["bad"] == 1
    assert main(["check", f"file://{tmp_path}/disk", "--deep", "--fix"]) == 0
    assert main(["check", f"file://{tmp_path}/disk", "--deep"]) == 0
    assert main(["check", f"file://{tmp_path}/nothing"]) == 2
