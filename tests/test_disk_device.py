"""The disk tier's device path (GDS loads verified by dsum128) and dsum128 itself.

Without a GPU, ``gds=posix`` sends CPU tensors down the same code through NIXL's POSIX backend:
header pages on the host, payloads in one NIXL transfer straight into the caller's rows,
verification with dsum128 where the rows are.  The CUDA variants run where a GPU is present
(benchmarks/gpu_check.py runs them on the device machine); here they skip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kvbm_fs import codec, dsum
from kvbm_fs.errors import ConfigError
from kvbm_fs.events import EventKind
from kvbm_fs.keys import BlockKeys
from kvbm_fs.testing import EventRecorder, require_nixl
from kvbm_fs.tiers.disk import HEADER_PAGE, DiskTier

BN = 64 * 1024
CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device"))]


def _mode(device: str) -> str:
    """``KVBM_FS_GDS_MODE`` picks the NIXL backend (GDS_MT, GDS) in a GPU run; "on" lets the tier choose."""
    return "posix" if device == "cpu" else os.environ.get("KVBM_FS_GDS_MODE", "on")


def _rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, BN), dtype=np.uint8)


def _keys(n: int, ns: int = 5) -> BlockKeys:
    return BlockKeys.chain(ns, np.arange(1, n + 1, dtype=np.uint64))


def _tier(path: Path, device: str, **kw: Any) -> DiskTier:
    require_nixl()
    t = DiskTier(path, BN, capacity=64 * (BN + 2 * HEADER_PAGE), gds=_mode(device), **kw)
    if t.device.engine is None:
        t.close()
        pytest.skip(f"no NIXL device engine here: {t.device.state}")
    return t


def _stored(t: DiskTier, n: int) -> tuple[BlockKeys, torch.Tensor]:
    """``n`` blocks of test rows, put into ``t`` (every one must be stored)."""
    keys, data = _keys(n), torch.from_numpy(_rows(n))
    assert t.put(keys, data).all()
    return keys, data


def _slot_payload_offset(t: DiskTier, key_hash: int, ns: int = 5) -> tuple[str, int]:
    rec = t.index.records(ns, np.array([key_hash], np.uint64))[0]
    assert rec is not None
    seg, off = t._locate(rec.slot)
    return t._segment_path(seg), off


def _flip(path: str, pos: int, mask: int) -> None:
    """Flip bits of one stored byte behind the tier's back."""
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ mask]))


# ---- dsum128 ------------------------------------------------------------------------------
@pytest.mark.parametrize("nbytes", [4, 12, 4096, 1 << 21])
def test_dsum_rows_on_torch_equals_the_numpy_definition(nbytes: int) -> None:
    data = np.random.default_rng(nbytes).integers(0, 256, (3, nbytes), dtype=np.uint8)
    assert dsum.to_ints(dsum.rows(torch.from_numpy(data))) == [dsum.of(r) for r in data]


def test_dsum_catches_flips_moves_and_stale_pages() -> None:
    data = _rows(1)[0]
    base = dsum.of(data)
    rng = np.random.default_rng(1)
    for pos in rng.integers(0, BN, 64).tolist():
        for bit in (0, 7):
            bad = data.copy()
            bad[pos] ^= 1 << bit
            assert dsum.of(bad) != base
    swapped = data.copy()
    swapped[:4096], swapped[4096:8192] = data[4096:8192], data[:4096]  # two pages written to each other's place
    assert dsum.of(swapped) != base
    stale = data.copy()
    stale[8192:12288] = _rows(1, seed=9)[0][:4096]  # a torn write: one page of the slot's old occupant
    assert dsum.of(stale) != base


def test_dsum_refuses_rows_it_is_not_defined_for() -> None:
    assert not dsum.eligible(6) and not dsum.eligible(0) and dsum.eligible(8)
    with pytest.raises(ValueError, match="multiple of 4"):
        dsum.rows(torch.zeros((2, 6), dtype=torch.uint8))


# ---- the device path ----------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_tensor_puts_record_dsum_and_loads_verify_it_on_the_device(tmp_path: Path, device: str) -> None:
    t = _tier(tmp_path, device)
    data = torch.from_numpy(_rows(8)).to(device)
    keys = _keys(8)
    assert t.put(keys, data).all()
    out = torch.zeros_like(data)
    assert t.get(keys, out).all()
    assert torch.equal(out, data)
    s = t.stats()
    assert s["dsum_stores"] == 8 and s["device_loads"] == 8 and s["device_host_loads"] == 0
    assert s["gds_engine"]["nixl_ops"] == 8 and s["gds"] in ("POSIX", "GDS_MT", "GDS")
    path, off = _slot_payload_offset(t, int(keys.hashes[0]))
    with open(path, "rb") as f:
        f.seek(off)
        h = codec.decode_header(f.read(codec.HEADER_SIZE))
    assert h.dsum == dsum.of(_rows(8)[0]) and h.checksum == codec.payload_checksum(_rows(8)[0])
    t.close()


@pytest.mark.parametrize("device", DEVICES)
def test_blocks_stored_from_host_memory_load_into_tensors_through_the_host(tmp_path: Path, device: str) -> None:
    t = _tier(tmp_path, device)
    keys = _keys(6)
    assert t.put(keys, _rows(6)).all()  # numpy rows: xxh3 only
    out = torch.zeros((6, BN), dtype=torch.uint8, device=device)
    assert t.get(keys, out).all()
    assert np.array_equal(out.cpu().numpy(), _rows(6))
    s = t.stats()
    assert s["device_host_loads"] == 6 and s["device_loads"] == 0
    t.close()


@pytest.mark.parametrize("device", DEVICES)
def test_a_flipped_payload_bit_is_a_miss_reported_and_removed(tmp_path: Path, device: str) -> None:
    rec = EventRecorder()
    t = _tier(tmp_path, device, events=rec.bus)
    keys = _keys(4)
    data = torch.from_numpy(_rows(4)).to(device)
    assert t.put(keys, data).all()
    path, off = _slot_payload_offset(t, int(keys.hashes[2]))
    _flip(path, off + HEADER_PAGE + 1234, 0x10)
    out = torch.zeros_like(data)
    assert t.get(keys, out).tolist() == [True, True, False, True]
    assert torch.equal(out[[0, 1, 3]], data[[0, 1, 3]])
    assert t.stats()["dsum_failures"] == 1
    assert t.contains(keys).tolist() == [True, True, False, True]
    assert (5, int(keys.hashes[2])) in rec.keys(EventKind.LOAD_FAILED)
    t.close()


def test_a_foreign_header_is_caught_before_any_payload_moves(tmp_path: Path) -> None:
    t = _tier(tmp_path, "cpu")
    keys = _keys(2)
    assert t.put(keys, torch.from_numpy(_rows(2))).all()
    p0, o0 = _slot_payload_offset(t, int(keys.hashes[0]))
    p1, o1 = _slot_payload_offset(t, int(keys.hashes[1]))
    with open(p0, "r+b") as f, open(p1, "rb") as g:
        g.seek(o1)
        f.seek(o0)
        f.write(g.read(HEADER_PAGE))  # block 0's slot now claims to hold block 1
    out = torch.zeros((2, BN), dtype=torch.uint8)
    assert t.get(keys, out).tolist() == [False, True]
    assert t.stats()["gds_engine"]["nixl_ops"] == 1  # only the good block's payload was read
    t.close()


def test_a_device_transfer_that_fails_is_redone_through_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = _tier(tmp_path, "cpu")
    keys, data = _stored(t, 4)
    engine = t.device.engine
    assert engine is not None
    monkeypatch.setattr(engine._agent, "initialize_xfer", _refuse)
    out = torch.zeros_like(data)
    assert t.get(keys, out).all() and torch.equal(out, data)
    s = t.stats()
    assert s["device_retries"] == 1 and s["device_host_loads"] == 4 and s["gds_engine"]["failed_transfers"] == 1
    t.close()


def _refuse(*a: Any, **k: Any) -> Any:
    raise RuntimeError("NIXL_ERR_BACKEND (injected)")


def test_a_reopened_tier_loads_device_written_blocks_on_any_path(tmp_path: Path) -> None:
    t = _tier(tmp_path, "cpu")
    keys = _keys(5)
    data = _rows(5)
    assert t.put(keys, torch.from_numpy(data)).all()
    t.close()
    host = DiskTier(tmp_path, BN, capacity=64 * (BN + 2 * HEADER_PAGE), gds="off")
    out = np.zeros_like(data)
    assert host.get(keys, out).all() and np.array_equal(out, data)  # xxh3 on the host path
    assert host.check(deep=True)["bad"] == 0
    host.close()


def test_a_deep_check_holds_the_dsum128_to_the_payload(tmp_path: Path) -> None:
    """A header whose dsum128 disagrees with a payload that still matches its xxh3 (a writer bug)
    would fail every GPU load: the deep check reports it."""
    t = _tier(tmp_path, "cpu")
    keys = _keys(3)
    assert t.put(keys, torch.from_numpy(_rows(3))).all()
    path, off = _slot_payload_offset(t, int(keys.hashes[1]))
    t.close()
    with open(path, "r+b") as f:
        f.seek(off)
        head = bytearray(f.read(codec.HEADER_SIZE))
        head[80] ^= 1
        f.seek(off)
        f.write(_reseal(bytes(head)))
    host = DiskTier(tmp_path, BN, capacity=64 * (BN + 2 * HEADER_PAGE), gds="off")
    assert host.check()["bad"] == 0  # the header itself is well formed
    report = host.check(deep=True)
    assert report["bad"] == 1 and "dsum128" in report["bad_keys"][0][1]
    host.close()


def _reseal(head: bytes) -> bytes:
    import xxhash

    crc = xxhash.xxh3_64(head[:72] + head[80:128]).intdigest()
    return head[:72] + crc.to_bytes(8, "little") + head[80:]


def test_gds_modes_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown gds mode"):
        DiskTier(tmp_path / "a", BN, capacity="4MiB", gds="maybe")
    if not CUDA:
        with pytest.raises(ConfigError, match="gds=on"):
            DiskTier(tmp_path / "b", BN, capacity="4MiB", gds="on")


def test_the_default_mode_without_cuda_reports_the_host_path(tmp_path: Path) -> None:
    t = DiskTier(tmp_path, BN, capacity="4MiB")
    s = t.stats()
    assert s["gds_mode"] == "auto"
    if not CUDA:
        assert s["gds"] == "not probed" and "gds_engine" not in s
        keys = _keys(2)
        assert t.put(keys, torch.from_numpy(_rows(2))).all()  # CPU tensors: the plain host path
        assert t.stats()["dsum_stores"] == 0
    t.close()


def test_without_an_engine_tensor_loads_take_the_plain_path(tmp_path: Path) -> None:
    """No engine (NIXL missing, or cuFile refused): a get into a tensor reads once on the host
    path, and puts still record dsum128 for a later reader that has GDS."""
    require_nixl()
    t = DiskTier(tmp_path, BN, capacity="4MiB", gds="posix")
    assert t.device.engine is not None
    t.device.engine.close()
    t.device.engine = None
    keys = _keys(3)
    data = torch.from_numpy(_rows(3))
    assert t.put(keys, data).all() and t.stats()["dsum_stores"] == 3
    out = torch.zeros_like(data)
    assert not t.device.loads(out)
    assert t.get(keys, out).all() and torch.equal(out, data)
    assert t.stats()["device_host_loads"] == 0  # not routed through the device path at all
    t.close()


def test_odd_sized_blocks_keep_to_the_host_path(tmp_path: Path) -> None:
    require_nixl()
    bn = 4098
    t = DiskTier(tmp_path, bn, capacity="4MiB", gds="posix")
    keys = _keys(3)
    data = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (3, bn), dtype=np.uint8))
    assert t.put(keys, data).all()
    out = torch.zeros_like(data)
    assert t.get(keys, out).all() and torch.equal(out, data)
    assert t.stats()["dsum_stores"] == 0 and t.stats()["device_loads"] == 0
    t.close()


def test_gds_option_travels_through_the_url(tmp_path: Path) -> None:
    from kvbm_fs import KVLayout, mount

    require_nixl()
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, block_size=16, dtype="float16")
    store = mount(f"file://{tmp_path}?capacity=4MiB&gds=posix", layout=layout, env={})
    assert store.tiers[0].stats()["gds_mode"] == "posix"
    store.close()
    assert os.path.exists(tmp_path / "kvbm_fs.json")


def test_a_buffer_loaded_into_again_is_registered_once_and_held(tmp_path: Path) -> None:
    """Registering GPU memory with cuFile is slow, so a storage used a second time stays registered
    (and referenced, so it cannot be freed under the registration); one used once is not held."""
    t = _tier(tmp_path, "cpu")
    keys, data = _stored(t, 4)
    out = torch.zeros_like(data)
    for _ in range(3):
        assert t.get(keys, out).all() and torch.equal(out, data)
    eng = t.stats()["gds_engine"]
    assert eng["region_registrations"] == 1 and eng["cached_regions"] == 1
    fresh = [torch.zeros((5, BN), dtype=torch.uint8) for _ in range(3)]  # alive together: distinct storages
    for f in fresh:
        assert t.get(keys, f).all() and torch.equal(f[:4], data)
    assert t.stats()["gds_engine"]["cached_regions"] == 1
    t.close()


def test_the_registration_cache_is_bounded(tmp_path: Path) -> None:
    t = _tier(tmp_path, "cpu")
    engine = t.device.engine
    assert engine is not None
    engine.cache_bytes = 3 * BN * 4
    keys = _keys(4)
    assert t.put(keys, torch.from_numpy(_rows(4))).all()
    outs = [torch.zeros((4, BN), dtype=torch.uint8) for _ in range(5)]
    for out in outs * 2:
        assert t.get(keys, out).all()
    assert t.stats()["gds_engine"]["cached_regions"] == 3
    t.close()


def test_an_engine_registers_its_kv_cache_for_good(tmp_path: Path) -> None:
    t = _tier(tmp_path, "cpu")
    keys, data = _stored(t, 4)
    kv = torch.zeros((16, BN), dtype=torch.uint8)
    assert t.register_device_memory(kv)
    assert t.get(keys, kv[4:8]).all() and torch.equal(kv[4:8], data)  # a view into the registered storage
    eng = t.stats()["gds_engine"]
    assert eng["region_registrations"] == 1 and eng["cached_regions"] == 0
    t.unregister_device_memory(kv)
    off = DiskTier(tmp_path / "off", BN, capacity="4MiB", gds="off")
    assert not off.register_device_memory(kv)
    off.close()
    t.close()


@pytest.mark.parametrize("device", DEVICES)
def test_gds_write_sends_payloads_from_the_tensor_and_every_path_reads_them(tmp_path: Path, device: str) -> None:
    t = _tier(tmp_path, device, gds_write=True)
    keys = _keys(6)
    data = torch.from_numpy(_rows(6)).to(device)
    assert t.put(keys, data).all()
    assert t.stats()["device_stores"] == 6
    out = torch.zeros_like(data)
    assert t.get(keys, out).all() and torch.equal(out, data)  # device path: dsum128
    host = np.zeros((6, BN), np.uint8)
    assert t.get(keys, host).all() and np.array_equal(host, _rows(6))  # host path: xxh3-128
    assert t.check(deep=True)["bad"] == 0
    t.close()


def test_a_refused_gds_write_is_redone_from_the_staged_host_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = _tier(tmp_path, "cpu", gds_write=True)
    engine = t.device.engine
    assert engine is not None
    monkeypatch.setattr(engine._agent, "initialize_xfer", _refuse)
    keys = _keys(4)
    assert t.put(keys, torch.from_numpy(_rows(4))).all()
    s = t.stats()
    assert s["device_stores"] == 0 and s["device_retries"] == 1
    monkeypatch.undo()
    host = np.zeros((4, BN), np.uint8)
    assert t.get(keys, host).all() and np.array_equal(host, _rows(4))
    t.close()


@pytest.mark.parametrize("device", DEVICES)
def test_moves_between_gpu_and_disk_tiers_stage_on_the_gpu(tmp_path: Path, device: str) -> None:
    """G1 -> G3 demotion records dsum128 from GPU rows; G3 -> G1 promotion loads through the device
    path into GPU staging rows, never a host bounce."""
    from kvbm_fs.tiers.gpu import GpuTier
    from kvbm_fs.transfer import transfer

    disk = _tier(tmp_path, device)
    gpu = GpuTier(16 * BN, BN, device=device)
    keys = _keys(6)
    data = torch.from_numpy(_rows(6)).to(device)
    assert gpu.put(keys, data).all()
    assert transfer(keys, gpu, disk).all()
    assert disk.stats()["dsum_stores"] == 6
    gpu.delete(keys)
    assert transfer(keys, disk, gpu).all()
    s = disk.stats()
    assert s["device_loads"] == 6 and s["device_host_loads"] == 0
    out = torch.zeros_like(data)
    assert gpu.get(keys, out).all() and torch.equal(out, data)
    disk.close()


def test_a_disk_tier_without_the_device_path_still_stages_on_the_host(tmp_path: Path) -> None:
    from kvbm_fs.tiers.gpu import GpuTier
    from kvbm_fs.transfer import transfer

    disk = DiskTier(tmp_path, BN, capacity="4MiB", gds="off")
    gpu = GpuTier(16 * BN, BN, device="cpu")
    keys = _keys(3)
    assert gpu.put(keys, torch.from_numpy(_rows(3))).all()
    assert not disk.moves_device_rows(gpu.buf)
    assert transfer(keys, gpu, disk).all()
    gpu.delete(keys)
    assert transfer(keys, disk, gpu).all()
    assert disk.stats()["dsum_stores"] == 0
    disk.close()


def test_device_loads_and_stores_from_many_threads_stay_exact(tmp_path: Path) -> None:
    """The engine (one NIXL agent), its registration cache and the pinned staging buffer are shared
    by every thread of a process: concurrent puts and gets must neither fail nor mix rows."""
    import threading

    t = _tier(tmp_path, "cpu", gds_write=True)
    errors: list[str] = []

    def worker(w: int) -> None:
        keys = _keys(4, ns=100 + w)
        data = torch.from_numpy(_rows(4, seed=w))
        out = torch.zeros_like(data)
        for _ in range(15):
            t.delete(keys)  # every round writes again
            if not t.put(keys, data).all():
                errors.append(f"{w}: put")
            out.zero_()
            if not (t.get(keys, out).all() and torch.equal(out, data)):
                errors.append(f"{w}: get")

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    s = t.stats()
    assert s["dsum_failures"] == 0 and s["device_loads"] == 4 * 15 * 4 and s["device_stores"] == 4 * 15 * 4
    t.close()


def test_after_a_transfer_that_could_not_be_cancelled_close_keeps_registrations(tmp_path: Path) -> None:
    """A stuck transfer may still touch registered memory: closing must not deregister (or free)
    it, and the engine stops using NIXL; loads go on through the host path."""
    t = _tier(tmp_path, "cpu")
    keys, data = _stored(t, 2)
    out = torch.zeros_like(data)
    for _ in range(2):
        assert t.get(keys, out).all()  # the second use keeps out's registration
    engine = t.device.engine
    assert engine is not None and engine.stats()["cached_regions"] == 1
    engine._stuck.append((object(), None, []))  # as _run leaves a transfer it could not cancel
    engine._broken = "a NIXL transfer timed out and could not be cancelled"
    calls: list[Any] = []
    engine._deregister = calls.append  # type: ignore[method-assign,assignment]
    out.zero_()
    assert t.get(keys, out).all() and torch.equal(out, data)
    assert t.stats()["device_retries"] == 1
    t.close()
    assert calls == []  # the cached registration was kept, not released under the stuck transfer


def test_kvbm_fs_gds_says_which_path_a_tier_here_would_take(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvbm_fs.cli import main

    assert main(["gds", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["directory"] == str(tmp_path) and isinstance(report["o_direct"], bool)
    if not CUDA:
        assert report["cuda"] is False and report["verdict"] == "host path: no CUDA device"
    assert os.listdir(tmp_path) == []  # the trial's scratch tier is gone


@pytest.mark.parametrize(
    ("facts", "verdict"),
    [
        (dict(nixl=None), "NIXL is not installed"),
        (dict(gds_backend="GDS_MT: NIXL_ERR_NOT_FOUND"), "no usable GDS backend"),
        (dict(trial=dict(device_loads=0), udev_id_fs_usage=False), "udev has no ID_FS_USAGE"),
        (dict(trial=dict(device_loads=0), udev_id_fs_usage=None), "not on a block device"),
        (dict(), "GDS loads through GDS_MT, cuFile compat mode"),
        (dict(nvidia_fs=True), "GDS loads through GDS_MT, true GPUDirect"),
    ],
)
def test_the_gds_verdict_names_what_stands_in_the_way(facts: dict[str, Any], verdict: str) -> None:
    from kvbm_fs.gds_doctor import _verdict

    base = dict(cuda=True, nixl="nixl_cu13", gds_backend="GDS_MT", nvidia_fs=False, udev_id_fs_usage=True,
                trial=dict(device_loads=4))  # fmt: skip
    assert verdict in _verdict({**base, **facts})


def test_host_written_blocks_loaded_into_tensors_read_each_header_once_and_verify_xxh3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks without a dsum128 take the host path, reusing the header pages already read: one
    header page and one payload per block, and a damaged payload is a miss, reported and removed."""
    t = _tier(tmp_path, "cpu")
    keys = _keys(3)
    assert t.put(keys, _rows(3)).all()  # numpy rows: no dsum128
    path, off = _slot_payload_offset(t, int(keys.hashes[1]))
    _flip(path, off + HEADER_PAGE + 7, 0x40)
    moved: list[int] = []
    read = t.io.read

    def counting(ops: Any) -> Any:
        moved.extend(op.nbytes for op in ops)
        return read(ops)

    monkeypatch.setattr(t.io, "read", counting)
    out = torch.zeros((3, BN), dtype=torch.uint8)
    assert t.get(keys, out).tolist() == [True, False, True]
    assert torch.equal(out[[0, 2]], torch.from_numpy(_rows(3)[[0, 2]]))
    assert sorted(moved) == [HEADER_PAGE] * 3 + [BN] * 3
    assert t.contains(keys).tolist() == [True, False, True]
    t.close()
