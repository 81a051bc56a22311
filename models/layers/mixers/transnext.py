"""TransNeXt's token mixer and feed-forward layer as NNX modules (Shi, 2024, "TransNeXt: Robust Foveal Visual
Perception for Vision Transformers", CVPR 2024, arXiv 2311.17132; official code DaiShiResearch/TransNeXt @ c8a9974,
`classification/attention_native.py` and `classification/transnext.py`).

`AggregatedAttention` replaces the whole attention layer of a ViT block (`SPATIAL_MIXERS["aggregated"]`): its pooled
branch feeds LN(AdaptiveAvgPool(GELU(Conv1x1(x)))) through the *same* key/value projection as the tokens, which the
shared layer's projections of x alone cannot express. The math is `attnx.ops.aggregated.aggregated_attention`.

With `n_shared` / `top_k` the layer is MoH-ViT's (Jin et al., 2024, "MoH: Multi-Head Attention as
Mixture-of-Head Attention", arXiv 2410.11842; SkyworkAI/MoH `MoH-ViT/attention_native.py`): TransNeXt with per-token
head gates from a router on the layer input, applied to the heads before the output projection.

`ConvGLU` is the paper's convolutional GLU (§3.3), registered as the ViT MLP "convglu" (models/layers/vision.py).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.ops.aggregated import aggregated_attention, pooled_tokens
from attnx.ops.aggregated import tables
from attnx.ops.heads.moh import apply_head_gates
from models.layers.mixers.moh import MoHRouter

# The code initialises every nn.Linear with trunc_normal_(std=.02) (and zero bias), query embedding and learnable
# tokens the same way; torch truncates at +-2 absolute, jax at +-2 std (indistinguishable at std .02).
_LINEAR = nnx.initializers.truncated_normal(stddev=0.02)


def _conv_init(fan_out: int):
    """The code's nn.Conv2d init: normal(0, sqrt(2 / fan_out)), fan_out = k * k * out_channels / groups."""
    return nnx.initializers.normal(stddev=math.sqrt(2.0 / fan_out))


class AggregatedAttention(nnx.Module):
    """TransNeXt attention of one block: tokens [B, h*w, D] -> [B, h*w, D].

    Built by `models.layers.attention.token_mixer` as `AggregatedAttention(width, num_heads, grid=, use_bias=,
    rngs=, param_dtype=, **attention_kwargs)`. attention_kwargs:
        window: odd local window side (3 in every TransNeXt stage that has one).
        sr_ratio: the pooled grid is grid // sr_ratio (TransNeXt: 8, 4, 2 in stages 1-3). sr_ratio=1 is the
            stage-4 layer: full attention with the same cosine/log-N logits, query embedding and CPB, no pooled
            branch and no local window (the code's Block picks `Attention` then).
        pool_size: a fixed pooled side instead of grid // sr_ratio (the code's fixed_pool_size).
        pretrain_grid: the grid the CPB offsets are normalised by (default the layer's grid).
        cpb_hidden: hidden width of the position-bias MLP (512).
        n_shared, top_k, balance_weight: MoH-ViT head gates (both None: none). The router is MoH's (owned here,
            models/layers/mixers/moh.py), so the same gates and balance loss (sown under nnx.capture and added by
            the task's loss) as MoH on any other mechanism; the gates scale heads before the output projection.
    use_bias: biases on the query/key/value projections (the code's qkv_bias); the output projection always has one.
    Class tokens are refused (TransNeXt has none): use pooling='mean'.
    """

    def __init__(self, width: int, num_heads: int, *, grid: tuple[int, ...], use_bias: bool = True,
                 rngs: nnx.Rngs, param_dtype=jnp.float32, window: int = 3, sr_ratio: int = 2,
                 pool_size: int | None = None, pretrain_grid: tuple[int, int] | None = None, cpb_hidden: int = 512,
                 n_shared: int | None = None, top_k: int | None = None, balance_weight: float = 0.01):
        self.kind = "aggregated"
        if not isinstance(grid, (tuple, list)) or len(grid) != 2 or not all(
                isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid):
            raise ValueError(f"AggregatedAttention.grid: expected (h, w), two positive ints, got {grid!r}")
        grid = (int(grid[0]), int(grid[1]))
        if width % num_heads:
            raise ValueError(f"AggregatedAttention: width={width} must be a multiple of num_heads={num_heads}")
        if not isinstance(sr_ratio, int) or isinstance(sr_ratio, bool) or sr_ratio < 1:
            raise ValueError(f"aggregated.sr_ratio: expected an int >= 1 (1: the full-attention stage), got "
                             f"{sr_ratio!r}")
        if not isinstance(window, int) or isinstance(window, bool) or window < 1 or window % 2 == 0:
            raise ValueError(f"aggregated.window: expected an odd int >= 1, got {window!r}")
        if not isinstance(cpb_hidden, int) or cpb_hidden < 1:
            raise ValueError(f"aggregated.cpb_hidden: expected a positive int, got {cpb_hidden!r}")
        self.grid = grid
        self.window = None if sr_ratio == 1 else window
        if self.window is None:
            self.pooled_grid = None
        elif pool_size is not None:
            if not isinstance(pool_size, int) or not 0 < pool_size <= min(grid):
                raise ValueError(f"aggregated.pool_size: expected an int in 1..{min(grid)} (the grid {grid}), got "
                                 f"{pool_size!r}")
            self.pooled_grid = (pool_size, pool_size)
        else:
            self.pooled_grid = (grid[0] // sr_ratio, grid[1] // sr_ratio)
            if min(self.pooled_grid) < 1:
                raise ValueError(f"aggregated.sr_ratio={sr_ratio} pools the grid {grid} to nothing; use an "
                                 f"sr_ratio <= {min(grid)} or pool_size")
        self.pretrain_grid = None if pretrain_grid is None else tuple(pretrain_grid)
        head_dim = width // num_heads
        params = lambda init, *shape: nnx.Param(init(rngs.params(), shape, param_dtype))
        zeros = lambda *shape: nnx.Param(jnp.zeros(shape, param_dtype))
        self.query_dnh = params(_LINEAR, width, num_heads, head_dim)
        self.key_dnh = params(_LINEAR, width, num_heads, head_dim)
        self.value_dnh = params(_LINEAR, width, num_heads, head_dim)
        self.query_bias_nh = zeros(num_heads, head_dim) if use_bias else None
        self.key_bias_nh = zeros(num_heads, head_dim) if use_bias else None
        self.value_bias_nh = zeros(num_heads, head_dim) if use_bias else None
        self.out_nhd = params(_LINEAR, num_heads, head_dim, width)
        self.out_bias_d = zeros(width)
        # softplus(temperature) = 1 / 0.24 at initialisation
        self.temperature_n = nnx.Param(jnp.full((num_heads,), math.log(math.expm1(1 / 0.24)), param_dtype))
        self.query_embedding_nh = params(_LINEAR, num_heads, head_dim)
        self.cpb_fc1_2c = params(_LINEAR, 2, cpb_hidden)
        self.cpb_fc1_bias_c = zeros(cpb_hidden)
        self.cpb_fc2_cn = params(_LINEAR, cpb_hidden, num_heads)
        self.cpb_fc2_bias_n = zeros(num_heads)
        if self.window is None:
            self.local_bias_nt = self.learnable_tokens_nht = self.learnable_bias_nt = None
            self.sr_dd = self.sr_bias_d = self.norm_scale_d = self.norm_bias_d = None
        else:
            taps = window * window
            self.local_bias_nt = params(nnx.initializers.truncated_normal(stddev=4e-4), num_heads, taps)
            self.learnable_tokens_nht = params(_LINEAR, num_heads, head_dim, taps)
            self.learnable_bias_nt = zeros(num_heads, taps)
            self.sr_dd = params(_conv_init(width), width, width)  # the 1x1 conv `sr`, [in, out]
            self.sr_bias_d = zeros(width)
            self.norm_scale_d = nnx.Param(jnp.ones((width,), param_dtype))
            self.norm_bias_d = zeros(width)
        # MoH-ViT's router, drawn last so that a gated layer shares every attention weight with a plain one built
        # from the same seed
        self.router = None if n_shared is None and top_k is None else MoHRouter(
            width, num_heads, n_shared=n_shared, top_k=top_k, balance_weight=balance_weight, rngs=rngs,
            param_dtype=param_dtype)

    def _project(self, x: jax.Array, weight: nnx.Param, bias: nnx.Param | None) -> jax.Array:
        out = jnp.einsum("btd,dnh->btnh", x, weight[...])
        return out if bias is None else out + bias[...]

    def __call__(self, x: jax.Array) -> jax.Array:
        tables.resolve_grid(self.grid, x.shape[1])  # class tokens: a clear error before any reshape
        query = self._project(x, self.query_dnh, self.query_bias_nh)
        key = self._project(x, self.key_dnh, self.key_bias_nh)
        value = self._project(x, self.value_dnh, self.value_bias_nh)
        get = lambda p: None if p is None else p[...]
        pooled = {}
        if self.window is not None:
            features = pooled_tokens(x, grid=self.grid, pooled_grid=self.pooled_grid, sr_kernel=self.sr_dd[...],
                                     sr_bias=self.sr_bias_d[...], norm_scale=self.norm_scale_d[...],
                                     norm_bias=self.norm_bias_d[...])
            pooled = dict(pooled_key=self._project(features, self.key_dnh, self.key_bias_nh),
                          pooled_value=self._project(features, self.value_dnh, self.value_bias_nh),
                          pooled_grid=self.pooled_grid)
        mixed = aggregated_attention(
            query, key, value, grid=self.grid, window=self.window, temperature=self.temperature_n[...],
            query_embedding=self.query_embedding_nh[...], local_bias=get(self.local_bias_nt),
            learnable_tokens=get(self.learnable_tokens_nht), learnable_bias=get(self.learnable_bias_nt),
            cpb=(self.cpb_fc1_2c[...], self.cpb_fc1_bias_c[...], self.cpb_fc2_cn[...], self.cpb_fc2_bias_n[...]),
            pretrain_grid=self.pretrain_grid, **pooled)
        if self.router is not None:
            mixed = apply_head_gates(mixed, self.router.gates(x, query))
        return jnp.einsum("btnh,nhd->btd", mixed, self.out_nhd[...]) + self.out_bias_d[...]


class ConvGLU(nnx.Module):
    """Convolutional GLU (TransNeXt §3.3): fc2(GELU(DWConv3x3(a)) * g), (a, g) = split(fc1(x)).

    Hidden width int(2 * mlp_width / 3) (the code keeps the GLU's parameter count near a plain MLP's); the 3x3
    depth-wise convolution (zero padding, with bias) runs over the token grid, i.e. the gating branch sees each
    token's 3x3 neighbourhood. `MLPS` signature: ConvGLU(width, mlp_width, *, grid, rngs, param_dtype), called
    tokens [B, T, D] -> [B, T, D] with the last h*w tokens row-major on `grid`. TransNeXt has no class tokens; any in
    front are treated as 1x1 images of their own (only the kernel's centre tap reaches them), so the layer also
    serves class-token ViTs.
    """

    def __init__(self, width: int, mlp_width: int, *, grid: tuple[int, int], rngs: nnx.Rngs, param_dtype=jnp.float32):
        hidden = int(2 * mlp_width / 3)
        if hidden < 1:
            raise ValueError(f"ConvGLU: mlp_width={mlp_width} gives a hidden width int(2 * {mlp_width} / 3) < 1")
        if not isinstance(grid, (tuple, list)) or len(grid) != 2:
            raise ValueError(f"ConvGLU.grid: expected (h, w), got {grid!r}")
        self.grid = tuple(int(g) for g in grid)
        params = lambda init, *shape: nnx.Param(init(rngs.params(), shape, param_dtype))
        zeros = lambda *shape: nnx.Param(jnp.zeros(shape, param_dtype))
        self.fc1_df = params(_LINEAR, width, 2 * hidden)
        self.fc1_bias_f = zeros(2 * hidden)
        self.dwconv_33f = params(_conv_init(9), 3, 3, hidden)  # depth-wise: fan_out = 3 * 3 * hidden / hidden
        self.dwconv_bias_f = zeros(hidden)
        self.fc2_fd = params(_LINEAR, hidden, width)
        self.fc2_bias_d = zeros(width)

    def depthwise(self, a: jax.Array) -> jax.Array:
        """[B, T, F] -> [B, T, F]: the 3x3 depth-wise convolution over the grid tokens (class tokens: centre tap)."""
        batch, length, features = a.shape
        h, w = self.grid
        extra = length - h * w
        if extra < 0:
            raise ValueError(f"ConvGLU: {length} tokens cannot fill the grid {self.grid}")
        kernel = self.dwconv_33f[...]
        image = a[:, extra:].reshape(batch, h, w, features)
        conv = jax.lax.conv_general_dilated(image, kernel[:, :, None, :].astype(a.dtype), (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=features)
        out = conv.reshape(batch, h * w, features)
        if extra:
            out = jnp.concatenate([a[:, :extra] * kernel[1, 1].astype(a.dtype), out], axis=1)
        return out + self.dwconv_bias_f[...]

    def __call__(self, x: jax.Array) -> jax.Array:
        a, gate = jnp.split(x @ self.fc1_df[...] + self.fc1_bias_f[...], 2, axis=-1)
        return (jax.nn.gelu(self.depthwise(a), approximate=False) * gate) @ self.fc2_fd[...] + self.fc2_bias_d[...]
