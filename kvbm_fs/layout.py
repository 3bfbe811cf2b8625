"""KV layout: the shape, dtype and axis order of one block of KV cache.

Everything that makes two blocks' bytes incomparable lives here, so that it can be
folded into the namespace id: same tokens under another layout are another block.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import ConfigError, LayoutMismatchError
from .hashing import check_block_size

# dtype name -> (itemsize, numpy dtype used to view the bytes on the host)
DTYPES: dict[str, tuple[int, str]] = {
    "float32": (4, "float32"),
    "float16": (2, "float16"),
    "bfloat16": (2, "uint16"),
    "float8_e4m3fn": (1, "uint8"),
    "float8_e5m2": (1, "uint8"),
    "int8": (1, "int8"),
    "uint8": (1, "uint8"),
}


def dtype_name(dtype: Any) -> str | None:
    """The layout dtype name of a torch (or numpy) dtype, or None when no layout holds it. Engines hand
    over torch dtypes; layouts and namespaces speak names, so every connector converts here."""
    name = str(dtype).removeprefix("torch.")
    return name if name in DTYPES else None


def torch_dtype(name: str) -> Any:
    """The torch dtype of a layout dtype name (torch imported only when asked)."""
    import torch

    return getattr(torch, name)


# Axis letters: L layers, K the K/V pair, T tokens in the block, H KV heads, D head dim.
AXES_MHA = frozenset("LKTHD")
AXES_MLA = frozenset("LTD")


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str = "float16"
    order: str = "LKTHD"
    mla: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"KVLayout.{name} must be a positive int, got {v!r}")
            object.__setattr__(self, name, int(v))  # numpy ints would not serialise canonically
        object.__setattr__(self, "block_size", check_block_size(self.block_size))
        if not isinstance(self.mla, bool):
            raise ConfigError(f"KVLayout.mla must be a bool, got {self.mla!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"KVLayout.dtype {self.dtype!r} unknown; expected one of {sorted(DTYPES)}")
        want = AXES_MLA if self.mla else AXES_MHA
        if len(self.order) != len(want) or set(self.order) != want:
            kind = "MLA" if self.mla else "MHA"
            raise ConfigError(
                f"KVLayout.order {self.order!r} must be a permutation of {''.join(sorted(want))} for {kind}"
            )
        if self.mla and self.num_kv_heads != 1:
            raise ConfigError("an MLA layout has one latent head: num_kv_heads must be 1")

    @property
    def block_shape(self) -> tuple[int, ...]:
        dims = {"L": self.num_layers, "K": 2, "T": self.block_size, "H": self.num_kv_heads, "D": self.head_dim}
        return tuple(dims[a] for a in self.order)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][0]

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(DTYPES[self.dtype][1])

    @property
    def block_nbytes(self) -> int:
        return math.prod(self.block_shape) * self.itemsize

    @property
    def layer_nbytes(self) -> int:
        return self.block_nbytes // self.num_layers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVLayout:
        known = {f for f in cls.__dataclass_fields__}
        extra = set(d) - known
        if extra:
            raise ConfigError(f"unknown KVLayout field(s): {sorted(extra)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"bad KVLayout: {e}") from None

    def check_blocks(self, data: Any) -> Any:
        """Validate KV-shaped data ``[n, *block_shape]`` (or raw ``[n, block_nbytes]`` uint8); return a uint8 ``[n, nbytes]`` view."""
        if not (hasattr(data, "shape") and hasattr(data, "dtype")) or isinstance(data, type):
            raise LayoutMismatchError(
                f"block data is a {type(data).__name__}; this layout needs a numpy array or torch tensor"
                f" [n, {', '.join(map(str, self.block_shape))}] of {self.dtype} (order {self.order})"
                f" or raw uint8 rows [n, {self.block_nbytes}]"
            )
        shape = tuple(data.shape)
        if len(shape) < 2:
            raise LayoutMismatchError(
                f"block data has shape {shape}; this layout needs [n, {', '.join(map(str, self.block_shape))}]"
                f" (order {self.order}) or raw uint8 [n, {self.block_nbytes}]"
            )
        if len(shape) == 2 and _is_u8(data) and shape[1] == self.block_nbytes:
            return data
        if shape[1:] != self.block_shape:
            raise LayoutMismatchError(
                f"block data has shape {shape}; this layout needs [n, {', '.join(map(str, self.block_shape))}]"
                f" (order {self.order}) or raw uint8 [n, {self.block_nbytes}]"
            )
        got = _dtype_name(data)
        host = DTYPES[self.dtype][1]  # numpy has no bfloat16/float8: their bytes arrive as uint16/uint8
        if got not in (self.dtype, host) and not (got == "int16" and self.dtype == "bfloat16"):
            raise LayoutMismatchError(f"block data has dtype {got}; this layout needs {self.dtype}")
        return as_u8_rows(data)


def _is_u8(data: Any) -> bool:
    return _dtype_name(data) == "uint8"


def _dtype_name(data: Any) -> str:
    return str(data.dtype).removeprefix("torch.")


def as_u8_rows(data: Any) -> Any:
    """View ``[n, ...]`` numpy/torch data as uint8 ``[n, row_bytes]`` without copying (copies only if non-contiguous)."""
    n = data.shape[0]
    row = math.prod(data.shape[1:]) * data.element_size() if hasattr(data, "element_size") else None
    if row is not None:  # torch
        import torch

        return data.contiguous().view(-1).view(torch.uint8).view(n, row)
    arr = np.ascontiguousarray(data)
    return arr.reshape(n, math.prod(arr.shape[1:])).view(np.uint8)
