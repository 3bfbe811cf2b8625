"""The operator commands (kvbm-fs ls, du, stat, rm, verify, cp) on real disk tiers and moto S3, read
back through their --json output."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm_fs import cli, mount
from kvbm_fs.codec import HEADER_SIZE
from kvbm_fs.keys import BlockKeys
from kvbm_fs.testing import LAYOUT

SLOT = 4096 + LAYOUT.block_nbytes  # a disk slot: header page + payload (8 KiB, already 4 KiB-aligned)
OBJ = HEADER_SIZE + LAYOUT.block_nbytes  # a remote object


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    """``kvbm-fs ARGV --json`` in this process: (exit code, parsed stdout)."""
    capsys.readouterr()
    rc = cli.main([*argv, "--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out) if out.strip() else None


def fill(tiers: list[Any], tenant: str, n: int, seed: int, tier: str | None = None) -> tuple[BlockKeys, np.ndarray]:
    """Put ``n`` blocks of one prompt in a namespace of ``tenant``; their keys and tokens."""
    toks = np.random.default_rng(seed).integers(0, 50_000, n * LAYOUT.block_size)
    with mount(*tiers, layout=LAYOUT, model="admin-model", tenant=tenant, env={}) as s:
        keys = s.keys(toks)
        data = np.random.default_rng(seed + 1).integers(0, 256, (n, LAYOUT.block_nbytes), dtype=np.uint8)
        assert s.put(keys, data, tier=tier).all()
    return keys, toks


def toml(path: Path, tiers: list[dict[str, Any]]) -> Path:
    """A config with the test layout and ``tiers`` (tables, nested tables for storage options)."""

    def table(name: str, d: dict[str, Any], array: bool = False) -> list[str]:
        out = [f"[[{name}]]" if array else f"[{name}]"]
        out += [f"{k} = {json.dumps(v)}" for k, v in d.items() if not isinstance(v, dict)]
        for k, v in d.items():
            if isinstance(v, dict):
                out += table(f"{name}.{k}", v)
        return out

    lines = ["model = 'admin-model'", *table("layout", LAYOUT.to_dict())]
    for t in tiers:
        lines += table("tiers", t, array=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def disk(tmp_path: Path) -> dict[str, Any]:
    """A disk tier with two namespaces: tenant a (6 blocks) and tenant b (4 blocks)."""
    url = f"file://{tmp_path}/disk?capacity=1MiB"
    a, ta = fill([url], "a", 6, 1)
    b, tb = fill([url], "b", 4, 2)
    return dict(url=f"file://{tmp_path}/disk", path=tmp_path / "disk", a=a, b=b, tokens_a=ta, tokens_b=tb)


@pytest.fixture
def s3(moto_s3: Any, bucket: str, prefix: str) -> dict[str, Any]:
    so = moto_s3.storage_options()
    return dict(table={"url": f"s3://{bucket}/{prefix}", "storage_options": so}, bucket=bucket, prefix=prefix,
                url=f"s3://{bucket}/{prefix}?endpoint_url={so['endpoint_url']}&key={so['key']}&secret={so['secret']}")  # fmt: skip


def _by_ns(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["namespace"]: r for r in rows}


def test_ls_and_du_on_a_disk_tier(disk: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(capsys, "ls", disk["url"])
    assert rc == 0
    rows = _by_ns(out["namespaces"])
    a, b = rows[f"{disk['a'].ns:016x}"], rows[f"{disk['b'].ns:016x}"]
    assert set(rows) == {f"{disk['a'].ns:016x}", f"{disk['b'].ns:016x}"}
    assert (a["blocks"], a["bytes"], a["tenant"], a["model"]) == (6, 6 * SLOT, "a", "admin-model")
    assert (b["blocks"], b["bytes"], b["tenant"]) == (4, 4 * SLOT, "b")
    assert a["layout"] == LAYOUT.to_dict() and a["rank"] == 0 and a["world_size"] == 1
    assert a["oldest"] is None  # the disk index records no write times
    rc, du = run(capsys, "du", disk["url"])
    (tier,) = du["tiers"]
    assert (tier["tier"], tier["blocks"], tier["bytes"], du["bytes"]) == ("disk", 10, 10 * SLOT, 10 * SLOT)
    assert sum(u["bytes"] for u in tier["namespaces"].values()) == tier["bytes"]
    assert tier["capacity_bytes"] == (1 << 20) // SLOT * SLOT


def test_ls_prints_a_table(disk: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["ls", disk["url"]]) == 0
    text = capsys.readouterr().out
    assert f"{disk['a'].ns:016x}" in text and "admin-model" in text and "2 namespaces, 10 blocks" in text


def test_a_missing_target_is_an_error_and_nothing_is_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["ls", f"file://{tmp_path}/none", "--json"]) == 2
    assert "no kvbm_fs disk tier" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    assert cli.main(["du", str(tmp_path / "nothing.toml")]) == 2


def test_stat_locates_each_block_in_its_tier(
    disk: dict[str, Any], s3: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = toml(tmp_path / "kvbm.toml", [{"url": disk["url"]}, s3["table"]])
    keys, toks = fill([disk["url"], s3["table"]], "c", 5, 3, tier="disk")
    head, _ = fill([disk["url"], s3["table"]], "c", 2, 3, tier="remote")  # the same prompt's first 2 blocks
    assert np.array_equal(head.hashes, keys.hashes[:2])
    more = np.concatenate([toks, np.arange(2 * LAYOUT.block_size)])  # two more blocks stored nowhere
    (tmp_path / "toks.json").write_text(json.dumps(more.tolist()))
    rc, out = run(capsys, "stat", str(cfg), "--tokens", str(tmp_path / "toks.json"), "--namespace", f"{keys.ns:016x}")
    (r,) = out["namespaces"]
    assert rc == 0 and r["blocks"] == 7 and r["tenant"] == "c"
    assert [k["tiers"] for k in r["keys"]] == [["disk", "remote"]] * 2 + [["disk"]] * 3 + [[]] * 2
    assert [k["hash"] for k in r["keys"][:5]] == [f"{h:016x}" for h in keys.hashes.tolist()]
    assert r["prefix"] == {"disk": 5, "remote": 2} and r["found"] == {"disk": 5, "remote": 2}
    rc, out = run(capsys, "stat", disk["url"], "--hash", f"{int(disk['a'].hashes[3]):016x}")
    found = {r["namespace"]: r["keys"][0]["tiers"] for r in out["namespaces"]}
    assert found[f"{disk['a'].ns:016x}"] == ["disk"] and found[f"{disk['b'].ns:016x}"] == []


def test_rm_dry_run_removes_nothing_then_rm_removes_exactly_the_namespace(
    disk: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    a = f"{disk['a'].ns:016x}"
    rc, out = run(capsys, "rm", disk["url"], "--namespace", a[:8], "--dry-run")
    assert (rc, out["dry_run"], out["selected"], out["removed"]) == (0, True, 6, 0)
    assert _by_ns(run(capsys, "ls", disk["url"])[1]["namespaces"])[a]["blocks"] == 6
    rc, out = run(capsys, "rm", disk["url"], "--namespace", a)
    assert (out["selected"], out["removed"]) == (6, 6)
    rows = _by_ns(run(capsys, "ls", disk["url"])[1]["namespaces"])
    assert rows[a]["blocks"] == 0 and rows[f"{disk['b'].ns:016x}"]["blocks"] == 4
    rc, out = run(capsys, "rm", disk["url"], "--tenant", "b")
    assert out["removed"] == 4 and run(capsys, "du", disk["url"])[1]["blocks"] == 0
    assert cli.main(["rm", disk["url"]]) == 2  # nothing said: nothing removed


def test_rm_older_than_uses_remote_write_times(s3: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    fill([s3["table"]], "a", 3, 4)
    out = run(capsys, "ls", s3["url"])[1]
    (row,) = out["namespaces"]
    assert row["blocks"] == 3 and row["bytes"] == 3 * OBJ and row["oldest"] is not None
    assert run(capsys, "rm", s3["url"], "--older-than", "1d")[1]["selected"] == 0
    out = run(capsys, "rm", s3["url"], "--older-than", "0s")[1]
    assert (out["selected"], out["removed"]) == (3, 3)
    assert run(capsys, "du", s3["url"])[1]["blocks"] == 0


def _flip_payload_byte(path: Path, slot: int = 0) -> None:
    seg = path / "seg" / "0000" / "000000.seg"
    with open(seg, "r+b") as f:
        f.seek(slot * SLOT + 4096 + 100)
        b = f.read(1)
        f.seek(slot * SLOT + 4096 + 100)
        f.write(bytes([b[0] ^ 0xFF]))


def test_verify_finds_a_corrupt_disk_block_and_fix_removes_it(
    disk: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out = run(capsys, "verify", disk["url"])
    assert (rc, out["entries"], out["bad"]) == (0, 10, 0)
    _flip_payload_byte(disk["path"])
    rc, out = run(capsys, "verify", disk["url"])
    assert (rc, out["bad"], out["fixed"]) == (1, 1, 0)
    assert "checksum" in out["tiers"][0]["bad_keys"][0][1]
    rc, out = run(capsys, "verify", disk["url"], "--fix")
    assert (rc, out["bad"], out["fixed"]) == (0, 1, 1)
    rc, out = run(capsys, "verify", disk["url"])
    assert (rc, out["entries"], out["bad"]) == (0, 9, 0)


def test_verify_rebuild_index_recovers_a_lost_index(disk: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    disk_rebuild = pytest.importorskip("kvbm_fs.tiers.disk.rebuild")
    if not hasattr(disk_rebuild, "rebuild_index"):
        pytest.skip("this build has no index rebuild")

    shutil.rmtree(disk["path"] / "index")
    rc, out = run(capsys, "verify", disk["url"], "--rebuild-index")
    assert (rc, out["entries"], out["bad"], out["rebuilt"][0]["blocks"]) == (0, 10, 0, 10)
    rows = _by_ns(run(capsys, "ls", disk["url"])[1]["namespaces"])
    assert {r["tenant"]: r["blocks"] for r in rows.values()} == {"a": 6, "b": 4}


def test_verify_finds_a_corrupt_remote_object_and_fix_removes_it(
    s3: dict[str, Any], moto_s3: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    keys, _ = fill([s3["table"]], "a", 4, 5)
    h = int(keys.hashes[2])
    name = f"{s3['prefix']}/{keys.ns:016x}/{h >> 56:02x}/{h:016x}"
    client = moto_s3.client()
    body = bytearray(client.get_object(Bucket=s3["bucket"], Key=name)["Body"].read())
    body[HEADER_SIZE + 7] ^= 1
    client.put_object(Bucket=s3["bucket"], Key=name, Body=bytes(body))
    rc, out = run(capsys, "verify", s3["url"])
    assert (rc, out["entries"], out["bad"], out["fixed"]) == (1, 4, 1, 0)
    assert out["tiers"][0]["bad_keys"][0][0] == f"{keys.ns:016x}/{h:016x}"
    assert run(capsys, "du", s3["url"])[1]["blocks"] == 4  # verify alone removes nothing
    rc, out = run(capsys, "verify", s3["url"], "--fix")
    assert (rc, out["fixed"]) == (0, 1)
    rc, out = run(capsys, "verify", s3["url"])
    assert (rc, out["entries"], out["bad"]) == (0, 3, 0)


def test_cp_disk_to_s3_copies_verified_blocks_and_resumes(
    disk: dict[str, Any], s3: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = toml(tmp_path / "dst.toml", [s3["table"]])
    rc, out = run(capsys, "cp", disk["url"], str(cfg), "--limit", "4")
    assert (rc, out["written"], out["present"], out["failed"]) == (0, 4, 0, 0)
    rc, out = run(capsys, "cp", disk["url"], str(cfg))  # a second run writes only what is missing
    assert (out["written"], out["present"], out["failed"]) == (6, 4, 0)
    rc, out = run(capsys, "cp", disk["url"], str(cfg))
    assert (out["written"], out["present"]) == (0, 10)
    rows = _by_ns(run(capsys, "ls", str(cfg))[1]["namespaces"])
    assert {k: (r["blocks"], r["tenant"]) for k, r in rows.items()} == {
        f"{disk['a'].ns:016x}": (6, "a"),
        f"{disk['b'].ns:016x}": (4, "b"),
    }
    rc, out = run(capsys, "verify", str(cfg))
    assert (rc, out["entries"], out["bad"]) == (0, 10, 0)
    import fsspec

    src = fsspec.filesystem("kvbm", url=disk["url"], skip_instance_cache=True)
    dst = fsspec.filesystem("kvbm", config=str(cfg), skip_instance_cache=True)
    for f in src.find("/"):
        assert dst.cat(f) == src.cat(f)  # same canonical bytes: header (parent, tokens) and payload


def test_cp_of_one_namespace_into_a_new_disk_tier(
    disk: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = f"file://{tmp_path}/copy"
    rc, out = run(capsys, "cp", disk["url"], dst, "--namespace", f"{disk['b'].ns:016x}")
    assert (rc, out["written"]) == (0, 4)
    rows = run(capsys, "ls", dst)[1]["namespaces"]
    assert [(r["namespace"], r["blocks"], r["tenant"]) for r in rows] == [(f"{disk['b'].ns:016x}", 4, "b")]
    with mount(dst, layout=LAYOUT, model="admin-model", tenant="b", env={}) as s:  # a store reads the copies
        keys = s.keys(disk["tokens_b"])
        out_rows = np.empty((4, LAYOUT.block_nbytes), np.uint8)
        assert s.get(keys, out_rows).all()
    assert os.path.exists(tmp_path / "copy" / "kvbm_fs.json")
