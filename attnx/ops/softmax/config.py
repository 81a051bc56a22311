"""Configuration objects of the softmax-attention implementations, validated on construction.

An instance can be passed as `implementation=` wherever a name is accepted, e.g.
`attnx.dot_product_attention(q, k, v, implementation=attnx.Chunked(block_q=256, block_kv=512))`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar


def _positive_int(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}.{name}: expected a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Chunked:
    """The flash-attention algorithm in plain JAX (`attnx.ops.softmax.chunked`).

    block_q, block_kv: tile sizes. The defaults were tuned on a 2-core AMD EPYC (f32, H=64): 512 x 256 reached
    about 60% of the measured matmul rate at T=4096 causal, while square 256 or 512 tiles reached 35-42%.
    """

    name: ClassVar[str] = "chunked"
    block_q: int = 512
    block_kv: int = 256

    def __post_init__(self):
        _positive_int("Chunked", "block_q", self.block_q)
        _positive_int("Chunked", "block_kv", self.block_kv)


@dataclasses.dataclass(frozen=True)
class Reference:
    """Materialise all logits; float32 at the highest precision. The oracle."""

    name: ClassVar[str] = "reference"


@dataclasses.dataclass(frozen=True)
class Xla:
    """`jax.nn.dot_product_attention(implementation='xla')` where its features allow."""

    name: ClassVar[str] = "xla"


@dataclasses.dataclass(frozen=True)
class Cudnn:
    """`jax.nn.dot_product_attention(implementation='cudnn')` on NVIDIA GPUs, within cuDNN's limits."""

    name: ClassVar[str] = "cudnn"


@dataclasses.dataclass(frozen=True)
class PallasGpu:
    """Pallas flash-attention kernel for GPUs, Triton lowering (`attnx.ops.softmax.pallas_gpu`), with block
    skipping.

    block_q, block_kv: tile sizes, powers of two >= 16 (Triton's dot needs power-of-two tiles of at least 16);
    shorter sequences use a smaller tile (never below 16). num_warps: a power of two; num_stages: software pipeline
    depth (>= 1). interpret: run the kernel in Pallas interpret mode (CPU); None reads the environment variable
    ATTNX_PALLAS_INTERPRET ("1" = interpret) when the kernel runs.
    """

    name: ClassVar[str] = "pallas_gpu"
    block_q: int = 128
    block_kv: int = 64
    num_warps: int = 4
    num_stages: int = 2
    interpret: bool | None = None

    def __post_init__(self):
        for field in ("block_q", "block_kv"):
            value = getattr(self, field)
            _positive_int("PallasGpu", field, value)
            if value < 16 or value & (value - 1):
                raise ValueError(f"PallasGpu.{field}: expected a power of two >= 16 (Triton dot tiles), got {value}")
        _positive_int("PallasGpu", "num_warps", self.num_warps)
        if self.num_warps & (self.num_warps - 1):
            raise ValueError(f"PallasGpu.num_warps: expected a power of two, got {self.num_warps}")
        _positive_int("PallasGpu", "num_stages", self.num_stages)
        if self.interpret is not None and not isinstance(self.interpret, bool):
            raise TypeError(f"PallasGpu.interpret: expected None or a bool, got {self.interpret!r}")


@dataclasses.dataclass(frozen=True)
class PallasTpu:
    """Pallas flash-attention kernel for TPUs, Mosaic lowering (`attnx.ops.softmax.pallas_tpu`), with block
    skipping over scalar-prefetched block lists.

    block_q, block_kv: tile sizes, positive multiples of 8. On a TPU both must be multiples of 128 (the lane
    width; checked when the kernel runs); smaller multiples of 8 are for interpret mode (small test blocks). A
    sequence shorter than a tile uses one tile of its length rounded up to 8. interpret: run in Pallas interpret
    mode on CPU (TPU semantics emulated with `pltpu.InterpretParams`); None reads the environment variable
    ATTNX_PALLAS_INTERPRET ("1" = interpret) when the kernel runs.
    """

    name: ClassVar[str] = "pallas_tpu"
    block_q: int = 128
    block_kv: int = 128
    interpret: bool | None = None

    def __post_init__(self):
        for field in ("block_q", "block_kv"):
            value = getattr(self, field)
            _positive_int("PallasTpu", field, value)
            if value % 8:
                raise ValueError(f"PallasTpu.{field}: expected a multiple of 8 (TPU sublanes; 128 on a TPU), "
                                 f"got {value}")
        if self.interpret is not None and not isinstance(self.interpret, bool):
            raise TypeError(f"PallasTpu.interpret: expected None or a bool, got {self.interpret!r}")


IMPLEMENTATIONS: dict[str, type] = {
    cls.name: cls for cls in (Reference, Chunked, Xla, Cudnn, PallasGpu, PallasTpu)}
