"""How a remote tier reaches its store: the fsspec filesystem for a URL (with kvbm_fs's own retries in
place of botocore's), the data path (``io=``), the NIXL OBJ client with the credentials s3fs resolved,
and checks of the tier's numeric options.  The tier itself is :mod:`.tier`."""

from __future__ import annotations

import asyncio
from typing import Any

from kvbm_fs.errors import ConfigError

IO_PATHS = ("s3fs", "nixl", "auto")


def resolve_io(io: Any, url: str, shown: str) -> str:
    """The data path for block objects.  ``auto`` is s3fs: NIXL OBJ measured somewhat faster for hits
    (benchmarks/results/bench_remote.json, ``nixl_obj``), but a miss costs it a second round trip, its
    credentials are taken once and never refreshed, and it logs every failed transfer on stderr, so
    it is chosen only by name."""
    from fsspec.core import split_protocol

    if not isinstance(io, str) or io.lower() not in IO_PATHS:
        raise ConfigError(f"remote tier option io must be one of {', '.join(IO_PATHS)}")
    io = io.lower()
    proto = split_protocol(url)[0] or "file"
    if io == "nixl" and proto not in ("s3", "s3a"):
        raise ConfigError(f"io=nixl needs an s3:// tier URL; {shown} is {proto}://")
    return "s3fs" if io == "auto" else io


def nixl_client(fs: Any, bucket: str, shown: str, num_threads: int, timeout: float) -> Any:
    """A NixlObjClient on the bucket, with the endpoint, region and credentials s3fs/botocore resolved
    (storage options, environment, profile), so that both data paths reach the same store as the same
    user.  Credentials are taken once, here: refreshable ones (SSO, assumed roles) are not refreshed."""
    try:
        from kvbm_fs.nixl_api import api

        api()
        from kvbm_fs.tiers.remote.nixl_obj import NixlObjClient
    except ImportError:
        raise ConfigError(f"io=nixl for {shown}: NIXL is not installed (pip install nixl-cu12)") from None
    if getattr(fs, "anon", False):
        raise ConfigError(f"io=nixl for {shown}: NIXL OBJ signs its requests; anonymous access needs io=s3fs")
    from urllib.parse import urlsplit

    s3 = fs.s3
    endpoint = str(s3.meta.endpoint_url)
    aws = (urlsplit(endpoint).hostname or "").endswith(".amazonaws.com")
    style = (s3.meta.config.s3 or {}).get("addressing_style")
    creds = _frozen_credentials(fs)
    try:
        return NixlObjClient(
            bucket,
            endpoint=None if aws else endpoint,  # AWS itself: the SDK resolves the regional endpoint
            access_key=creds.access_key if creds else None,
            secret_key=creds.secret_key if creds else None,
            session_token=creds.token if creds else None,
            region=s3.meta.region_name or "us-east-1",
            virtual_addressing=style == "virtual" or (aws and style != "path"),
            num_threads=num_threads,
            timeout=timeout,
        )
    except (RuntimeError, ValueError, ImportError, OSError) as e:  # their messages hold no secrets
        raise ConfigError(f"io=nixl for {shown}: cannot set up NIXL's OBJ backend ({e})") from None


def _frozen_credentials(fs: Any) -> Any:
    """The (access_key, secret_key, token) botocore resolved for s3fs's client, or None."""
    from fsspec.asyn import sync

    creds = getattr(getattr(fs.s3, "_request_signer", None), "_credentials", None)
    if creds is None:
        return None

    async def frozen() -> Any:
        out = creds.get_frozen_credentials()
        return await out if asyncio.iscoroutine(out) else out

    try:
        return sync(fs.loop, frozen)
    except Exception:
        return None


def check_knobs(**knobs: float) -> None:
    """Refuse values that would hang or silently disable I/O: a zero semaphore waits forever, negative
    retries never send a request, a zero timeout fails every request."""
    import math

    for k, v in knobs.items():
        least = 1 if k in ("max_concurrency", "breaker_threshold") else 0
        timeout = k in ("timeout", "head_timeout")
        if not math.isfinite(v) or v < least or (timeout and v <= 0):
            want = "> 0" if timeout else f">= {least}"
            raise ConfigError(f"remote tier option {k}={v!r} is out of range (must be finite and {want})")


def whole_read_kwargs(fs: Any) -> dict[str, Any]:
    """s3fs's whole-object read first HEADs the object for its size (to split big ones): a second round
    trip per block. Blocks are read whole in one GET, so turn that off where the option exists."""
    import inspect

    if "max_concurrency" in inspect.signature(fs._cat_file).parameters:
        return {"max_concurrency": 1}
    return {}


def open_fs(url: str, storage_options: dict[str, Any], max_concurrency: int = 32) -> tuple[Any, str]:
    import fsspec
    from fsspec.core import split_protocol

    proto, _ = split_protocol(url)
    proto = proto or "file"
    try:
        cls = fsspec.get_filesystem_class(proto)
    except (ValueError, ImportError) as e:
        raise ConfigError(
            f"no fsspec filesystem for {proto}:// ({e}); install its package (e.g. kvbm-fs[s3])"
        ) from None
    opts = dict(storage_options)
    opts.setdefault("skip_instance_cache", True)
    if proto in ("s3", "s3a"):
        opts.setdefault("use_listings_cache", False)
        # botocore's defaults: a pool of 10 connections (requests past it would wait inside our timeout)
        # and its own retries (5 attempts, with backoff). One layer of retries, ours: `retries` bounds
        # them, `timeout` each try, and the breaker hears the final outcome.
        # Over plain http botocore SHA-256-signs every PUT body (a CPU pass over each block); over
        # https it already doesn't. Blocks carry their own checksum, verified on every read, and
        # the request's CRC32 header still lets the server reject a damaged upload.
        # The caller's config_kwargs win key by key, also inside "s3": a user who sets only
        # addressing_style (as MinIO and SeaweedFS guides say) keeps unsigned payloads.
        ck = dict(opts.get("config_kwargs") or {})
        s3 = ck.pop("s3", None) or {}
        if isinstance(s3, dict):  # anything else is botocore's to refuse
            s3 = {"payload_signing_enabled": False, **s3}
        opts["config_kwargs"] = {"max_pool_connections": max_concurrency, "retries": {"total_max_attempts": 1},
                                 **ck, "s3": s3}  # fmt: skip
    if proto in ("file", "local"):
        opts.setdefault("auto_mkdir", True)
    try:
        fs = cls(asynchronous=False, **opts) if getattr(cls, "async_impl", False) else cls(**opts)
        if proto in ("s3", "s3a"):  # s3fs hands unknown options to its botocore session: fail here, not per request
            fs.connect()
    except TypeError as e:
        raise ConfigError(f"bad storage option for {proto}:// ({_bad_option(e)})") from None
    except Exception as e:  # e.g. botocore's ProfileNotFound; the type names it, the message might hold values
        raise ConfigError(f"cannot set up {proto}:// from its storage options ({type(e).__name__})") from None
    if proto in ("s3", "s3a"):
        fs.retries = 1  # kvbm_fs retries itself, with its own backoff and breaker
    if not getattr(fs, "async_impl", False):
        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

        fs = AsyncFileSystemWrapper(fs, asynchronous=False)
    root = cls._strip_protocol(url).rstrip("/")
    if proto in ("file", "local"):
        import os

        os.makedirs(root, exist_ok=True)
    return fs, root


def _bad_option(e: TypeError) -> str:
    """The option a TypeError complains about, without echoing any value (which may be a secret)."""
    import re

    m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
    return f"unknown option {m.group(1)!r}" if m else "an option has the wrong type"


def protocols(fs: Any) -> tuple[str, ...]:
    inner = getattr(fs, "sync_fs", fs)
    p = getattr(inner, "protocol", ())
    return (p,) if isinstance(p, str) else tuple(p)


def loop_for(fs: Any) -> asyncio.AbstractEventLoop:
    from fsspec.asyn import get_loop

    return getattr(fs, "loop", None) or get_loop()
