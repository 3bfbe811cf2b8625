"""kvbm://: persistent tiers' blocks through fsspec (read-only; only rm writes), on real disk tiers and
moto S3. fsspec's abstract test suite writes fixture files, so the conventions are checked here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

from kvbm_fs import mount
from kvbm_fs.codec import HEADER_SIZE, encode_header
from kvbm_fs.errors import CorruptBlockError, KvbmError
from kvbm_fs.fs import KvbmFileSystem, ReadOnlyError
from kvbm_fs.keys import BlockKeys
from kvbm_fs.testing import LAYOUT

SIZE = HEADER_SIZE + LAYOUT.block_nbytes


def fill(tiers: list[Any], tenant: str, n: int, seed: int, tier: str | None = None) -> tuple[BlockKeys, np.ndarray]:
    toks = np.random.default_rng(seed).integers(0, 50_000, n * LAYOUT.block_size)
    data = np.random.default_rng(seed + 1).integers(0, 256, (n, LAYOUT.block_nbytes), dtype=np.uint8)
    with mount(*tiers, layout=LAYOUT, model="fs-model", tenant=tenant, env={}) as s:
        keys = s.keys(toks)
        assert s.put(keys, data, tier=tier).all()
    return keys, data


def canonical(keys: BlockKeys, i: int, data: np.ndarray) -> bytes:
    """docs/spec.md section 7: header (key, parent, token count, payload checksum) then payload."""
    return encode_header(keys[i], int(keys.parents[i]), LAYOUT.block_size, data[i]) + data[i].tobytes()


@pytest.fixture
def disk(tmp_path: Path) -> dict[str, Any]:
    url = f"file://{tmp_path}/disk"
    a, da = fill([url + "?capacity=1MiB"], "a", 5, 1)
    b, db = fill([url], "b", 3, 2)
    fs = fsspec.filesystem("kvbm", url=url, skip_instance_cache=True)
    return dict(url=url, path=tmp_path / "disk", a=a, b=b, data_a=da, data_b=db, fs=fs)


def test_registered_through_the_entry_point(disk: dict[str, Any]) -> None:
    assert fsspec.get_filesystem_class("kvbm") is KvbmFileSystem
    assert isinstance(disk["fs"], KvbmFileSystem)


def test_ls_root_gives_namespaces_and_a_namespace_its_blocks(disk: dict[str, Any]) -> None:
    fs, a, b = disk["fs"], disk["a"], disk["b"]
    na, nb = f"{a.ns:016x}", f"{b.ns:016x}"
    assert sorted(fs.ls("/", detail=False)) == sorted([na, nb])
    assert fs.ls("", detail=False) == fs.ls("/", detail=False) == fs.ls("kvbm://", detail=False)
    root = {d["name"]: d for d in fs.ls("/")}
    assert root[na]["type"] == "directory" and root[na]["tenant"] == "a" and root[na]["blocks"] == {"disk": 5}
    blocks = fs.ls(na)
    assert sorted(d["name"] for d in blocks) == sorted(f"{na}/{h:016x}" for h in a.hashes.tolist())
    assert all(d["type"] == "file" and d["size"] == SIZE and d["tier"] == "disk" for d in blocks)
    assert fs.ls(f"/{na}/", detail=False) == [d["name"] for d in blocks]
    one = f"{na}/{int(a.hashes[0]):016x}"
    assert fs.ls(one, detail=False) == [one]
    assert sorted(fs.find("/")) == sorted([d["name"] for d in blocks] + [f"{nb}/{h:016x}" for h in b.hashes.tolist()])


def test_info_on_namespaces_blocks_and_missing_paths(disk: dict[str, Any]) -> None:
    fs, a = disk["fs"], disk["a"]
    na = f"{a.ns:016x}"
    assert fs.info("/") == {"name": "", "size": 0, "type": "directory"}
    d = fs.info(na)
    assert (d["name"], d["type"], d["model"]) == (na, "directory", "fs-model")
    f = fs.info(f"kvbm://{na}/{int(a.hashes[2]):016x}")
    assert (f["name"], f["size"], f["type"], f["tier"]) == (f"{na}/{int(a.hashes[2]):016x}", SIZE, "file", "disk")
    assert fs.isdir(na) and fs.isfile(f["name"]) and fs.exists(f["name"])
    for missing in (f"{na}/{1:016x}", f"{1:016x}", "not-hex", f"{na}/{1:016x}/x"):
        assert not fs.exists(missing)
        with pytest.raises(FileNotFoundError):
            fs.info(missing)


def test_cat_gives_canonical_bytes_with_ranges_and_open_reads_them(disk: dict[str, Any]) -> None:
    fs, a, data = disk["fs"], disk["a"], disk["data_a"]
    for i in range(len(a)):
        path = f"{a.ns:016x}/{int(a.hashes[i]):016x}"
        want = canonical(a, i, data)
        assert fs.cat(path) == want
        assert fs.cat_file(path, start=100, end=300) == want[100:300]
        assert fs.cat_file(path, start=-10) == want[-10:]
        assert fs.read_block(path, HEADER_SIZE, 64) == want[HEADER_SIZE : HEADER_SIZE + 64]
    path = f"{a.ns:016x}/{int(a.hashes[1]):016x}"
    with fsspec.open(f"kvbm://{path}", url=disk["url"], skip_instance_cache=True) as f:
        assert f.read() == canonical(a, 1, data)
    with fs.open(path, "rb") as f:
        f.seek(HEADER_SIZE)
        assert f.read(16) == data[1, :16].tobytes()
    assert fs.cat([path, path.replace(path[-1], "x")], on_error="omit") == {path: canonical(a, 1, data)}
    with pytest.raises(IsADirectoryError):
        fs.cat_file(f"{a.ns:016x}")


def test_a_corrupt_block_raises_and_never_returns_bytes(disk: dict[str, Any]) -> None:
    fs, a = disk["fs"], disk["a"]
    seg = disk["path"] / "seg" / "0000" / "000000.seg"
    with open(seg, "r+b") as f:  # slot 0 holds the first block written: a's first
        f.seek(4096 + 5)
        f.write(b"\x00\xff\x00")
    path = f"{a.ns:016x}/{int(a.hashes[0]):016x}"
    with pytest.raises(CorruptBlockError, match="verification") as e:
        fs.cat(path)
    assert isinstance(e.value, KvbmError)
    with pytest.raises(CorruptBlockError):
        fs.open(path).read()
    assert fs.cat(f"{a.ns:016x}/{int(a.hashes[1]):016x}") == canonical(a, 1, disk["data_a"])  # others unharmed
    assert fs.exists(path)  # reading changed nothing


def test_only_rm_writes(disk: dict[str, Any]) -> None:
    fs, a, b = disk["fs"], disk["a"], disk["b"]
    one = f"{a.ns:016x}/{int(a.hashes[4]):016x}"
    for write in (
        lambda: fs.open(one, "wb"),
        lambda: fs.pipe_file(f"{a.ns:016x}/{7:016x}", b"x"),
        lambda: fs.mkdir("x"),
        lambda: fs.makedirs("x/y"),
        lambda: fs.touch(one),
        lambda: fs.mv(one, f"{a.ns:016x}/{8:016x}"),
        lambda: fs.put_file(__file__, one),
    ):
        with pytest.raises(PermissionError):
            write()
    assert issubclass(ReadOnlyError, KvbmError)
    assert fs.exists(one)
    fs.rm(one)
    assert not fs.exists(one) and len(fs.ls(f"{a.ns:016x}")) == 4
    with pytest.raises(IsADirectoryError):
        fs.rm(f"{b.ns:016x}")
    fs.rm(f"{b.ns:016x}", recursive=True)
    assert fs.ls(f"{b.ns:016x}") == []
    again = fsspec.filesystem("kvbm", url=disk["url"], skip_instance_cache=True)  # a fresh listing agrees
    assert len(again.ls(f"{a.ns:016x}")) == 4 and again.ls(f"{b.ns:016x}") == []


def test_config_and_tiers_over_disk_and_s3(
    disk: dict[str, Any], moto_s3: Any, bucket: str, prefix: str, tmp_path: Path
) -> None:
    s3 = {"url": f"s3://{bucket}/{prefix}", "storage_options": moto_s3.storage_options()}
    keys, data = fill([disk["url"], s3], "c", 4, 3, tier="disk")
    fill([disk["url"], s3], "c", 2, 3, tier="remote")  # the first two blocks are in both tiers
    fs = fsspec.filesystem("kvbm", tiers=[disk["url"], s3], skip_instance_cache=True)
    ns = f"{keys.ns:016x}"
    where = {d["name"].split("/")[1]: d["tiers"] for d in fs.ls(ns)}
    assert [where[f"{h:016x}"] for h in keys.hashes.tolist()] == [["disk", "remote"]] * 2 + [["disk"]] * 2
    remote = fsspec.filesystem("kvbm", url=f"s3://{bucket}/{prefix}?endpoint_url={moto_s3.endpoint}&key="
                               f"{s3['storage_options']['key']}&secret={s3['storage_options']['secret']}",
                               skip_instance_cache=True)  # fmt: skip
    assert sorted(remote.ls(ns, detail=False)) == sorted(f"{ns}/{h:016x}" for h in keys.hashes[:2].tolist())
    assert remote.cat(f"{ns}/{int(keys.hashes[1]):016x}") == canonical(keys, 1, data)
    cfg = tmp_path / "kvbm.toml"
    cfg.write_text(f"model = 'x'\ntiers = ['{disk['url']}']\n")
    assert sorted(fsspec.filesystem("kvbm", config=str(cfg), skip_instance_cache=True).ls("/", detail=False)) == sorted(
        fs.ls("/", detail=False)
    )


def test_needs_a_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVBM_FS_CONFIG", raising=False)
    with pytest.raises(ValueError, match="config="):
        fsspec.filesystem("kvbm", skip_instance_cache=True)
    with pytest.raises(ValueError, match="no kvbm_fs disk tier"):
        fsspec.filesystem("kvbm", url=f"file://{tmp_path}/none", skip_instance_cache=True)
    assert not (tmp_path / "none").exists()
