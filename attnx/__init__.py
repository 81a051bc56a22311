"""attnx: attention mechanisms from recent papers as pure JAX functions, with fast paths.

Public API (ARCHITECTURE §4): `dot_product_attention`, `dot_product_attention_with_lse`, `explain`, `Mask`, the
implementation configs (`Reference`, `Chunked`, `Xla`, `Cudnn`), the registry (`list_attentions`,
`get_attention`, `register_attention`, `AttentionSpec`) and the jax.nn / flax drop-ins in `attnx.compat`.
"""

from attnx.api import dot_product_attention, dot_product_attention_with_lse, explain, implementation_names
from attnx.mask import Mask
from attnx.ops.softmax.config import Chunked, Cudnn, PallasGpu, PallasTpu, Reference, Xla
from attnx.registry import AttentionSpec, get_attention, list_attentions, register_attention
from attnx import compat

__all__ = [
    "dot_product_attention",
    "dot_product_attention_with_lse",
    "explain",
    "implementation_names",
    "Mask",
    "Chunked",
    "Cudnn",
    "PallasGpu",
    "PallasTpu",
    "Reference",
    "Xla",
    "AttentionSpec",
    "get_attention",
    "list_attentions",
    "register_attention",
    "compat",
]
