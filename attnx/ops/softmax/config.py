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
    """Pallas flash-attention kernel for GPUs (Mosaic GPU / Triton lowering). Not written yet: the name is part of
    the contract (ARCHITECTURE §4) so that lists such as ["pallas_gpu", "chunked"] already fall through."""

    name: ClassVar[str] = "pallas_gpu"


@dataclasses.dataclass(frozen=True)
class PallasTpu:
    """Pallas flash-attention kernel for TPUs (Mosaic TPU). Not written yet; see `PallasGpu`."""

    name: ClassVar[str] = "pallas_tpu"


IMPLEMENTATIONS: dict[str, type] = {
    cls.name: cls for cls in (Reference, Chunked, Xla, Cudnn, PallasGpu, PallasTpu)}
