"""Decoder-only language model in the Llama style (Touvron et al., 2023, "LLaMA", arXiv 2302.13971, §2.2):
RMSNorm pre-normalisation, rotary positions, SwiGLU, grouped-query attention, tied or untied embeddings, optional
QK-norm, and a KV cache for `models.sampling.generate`.

`LLMConfig` is a frozen dataclass validated on construction; `LLM(config, rngs=...)` builds the NNX module. The
attention mixer is chosen by name (`LLMConfig.attention`, default "softmax") so that any registered causal
mechanism drops in with one gin line, e.g. `llm.LLMConfig.attention = 'lightning'` (ARCHITECTURE §5).

Presets (`llm_config(name)`; parameter counts are exact, tested):

| preset | vocab | width | depth | heads / kv | MLP | tied | params | shape from |
|---|---|---|---|---|---|---|---|---|
| tiny | 256 | 128 | 4 | 4 / 2 | 384 | yes | 0.82M | bytes; trains in minutes on CPU |
| 125m | 50304 | 768 | 12 | 12 / 12 | 2048 | yes | 123.6M | GPT-3 Small (Brown et al., 2020, Table 2.1) |
| 350m | 50304 | 1024 | 24 | 16 / 16 | 2752 | yes | 355.1M | GPT-3 Medium (same table) |
| 1b | 128256 | 2048 | 16 | 32 / 8 | 8192 | yes | 1235.8M | Llama 3.2 1B (Meta, 2024) |

125m and 350m keep GPT-3's width, depth and heads with the Llama block (SwiGLU at 8/3 width rounded up to 64) and
GPT-2's vocabulary padded to a multiple of 64. 1b is Llama 3.2 1B's shape (rope theta 500k, eps 1e-5) without its
long-context RoPE rescaling.

Per-layer token mixers (`LLMConfig.layer_attention`): a tuple of entries, repeated over the depth (layer l takes
entry l % len, like Zoology's `Hybrid`), each None (the config's `attention`), a name, or (name, kwargs). A name is a
registered attention mechanism (the shared `Attention` layer) or one of the LLM's own mixers, which replace the whole
attention layer (`MIXERS`): 'tnl' (TransNormerLLM's gated Lightning attention, models/layers/mixers/tnl.py) and
'base_conv' (Zoology's and Based's gated convolution, models/layers/mixers/base_conv.py). They are chosen through
layer_attention only, so that `attention` always names a registered mechanism (code that asks the registry about it
keeps working); a one-entry pattern puts a mixer in every layer, e.g. `llm.LLMConfig.layer_attention = ('tnl',)`
for a TransNormerLLM-style model (configs/attention/tnl.gin). Two kwargs are the LLM's, not
the function's: `qk_head_dim` in a layer entry sizes that layer's query/key heads (Based's 16 features beside full
sliding-window heads), and `slopes='tnl'` on a lightning or tnl layer becomes TransNormerLLM's per-layer decay
s_h (1 - l / (L - 1) + 1e-5) (arXiv 2307.14995, §3.1), 'alibi' the same ALiBi slopes in every layer. The Based LM
(arXiv 2402.18668) is configs/experiments/based_lm.gin.

Two block options, both off by default (off, the model and its parameters are exactly the plain Llama block's):
`representation_embeddings` gives every attention layer DARE's decoupled representation table (Feng et al., 2024,
"Long-Sequence Recommendation Models Need Decoupled Embeddings", arXiv 2410.02604, §4; thuml/DARE
`model/din_pytorch.py` keeps separate attention and representation embedding tables): queries and keys still come
from the residual stream (whose input is the token embedding, the attention table), but the values are rows of a
per-layer token-id table [vocab, value heads, head_dim] (what some LMs call value embeddings), so a layer's
attention map does not depend on its representation table. `parallel_block` is the parallel attention + FFN block
of BAM (Zhang et al., 2024, "BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts",
arXiv 2408.08274, §3): y = x + Attn(LN x) + FFN(LN x), one norm feeding both branches. `ffn_experts` replaces
each SwiGLU by BAM's top-k SwiGLU experts with a sown balance loss (models/layers/mixers/moa_experts.py
`ExpertSwiGLU`); BAM's full block is parallel_block with attention 'moa_experts' and ffn_experts
(configs/attention/moa_experts.gin).
"""

import dataclasses
from typing import Any, Literal, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

import attnx
from models.layers import PARAM_DTYPES, check_param_dtype
from models.layers.attention import Attention, KVCache, check_attention_choice
from models.layers.block_stack import check_identical_blocks, checkpointed_call, scan_blocks
from models.layers.embed import Embed
from models.layers.mixers.base_conv import BaseConv
from models.layers.mixers.moa_experts import ExpertSwiGLU, check_ffn_experts
from models.layers.mixers.multimodal import attention_inputs as publish_attention_inputs, check_attention_inputs, \
    residual_stream
from models.layers.mixers.tnl import TNLMixer, check_slopes, resolve_slopes
from models.layers.mlp import SwiGLU
from models.layers.norm import RMSNorm
from models.layers.sharding import constrain

# The LLM's own token mixers: modules that replace the attention layer, built as
# `cls(width, num_heads, num_kv_heads, head_dim, layer_index=, num_layers=, norm_eps=, rngs=, param_dtype=, **kwargs)`
# with the methods of `Attention` that a block uses: __call__(x, positions), init_cache, decode;
# `check_options(kwargs, num_heads=)` validates their kwargs at config time.
MIXERS = {"tnl": TNLMixer, "base_conv": BaseConv}

REMAT_CHOICES = ("none", "attention", "full")  # LLMConfig.remat


def _entry(owner: str, entry: Any, attention: str, attention_kwargs: Mapping[str, Any]
           ) -> tuple[str, dict[str, Any]]:
    """A layer_attention entry as (name, kwargs): None inherits the config's attention, a name has no kwargs."""
    if entry is None:
        return attention, dict(attention_kwargs)
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str) \
            and isinstance(entry[1], Mapping):
        return entry[0], dict(entry[1])
    raise ValueError(f"{owner}={entry!r}: expected None (the config's attention), a mechanism name, or "
                     f"(name, kwargs dict); names: registered attentions {attnx.list_attentions()} or the LLM's "
                     f"mixers {sorted(MIXERS)}")


def _check_mixer(owner: str, kind: str, kwargs: Any, num_heads: int, *, layer_entry: bool) -> None:
    """One token-mixer choice: known name, causal self attention supported, kwargs valid where we can tell."""
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{owner}.attention_kwargs must be a dict, got {kwargs!r}")
    kwargs = dict(kwargs)
    if "qk_head_dim" in kwargs:
        qk = kwargs.pop("qk_head_dim")
        if not layer_entry or kind in MIXERS:
            raise ValueError(f"{owner}: qk_head_dim is a layer option of attention layers in layer_attention "
                             f"entries (use LLMConfig.qk_head_dim for every layer), got it for {kind!r}")
        if not isinstance(qk, int) or isinstance(qk, bool) or qk < 0:
            raise ValueError(f"{owner}: qk_head_dim must be an int >= 0 (0 = head_dim), got {qk!r}")
    if kind in MIXERS and not layer_entry:
        raise ValueError(f"{owner}.attention={kind!r} is one of the LLM's own mixers {sorted(MIXERS)}, which replace "
                         f"the attention layer: choose it per layer, e.g. layer_attention=({kind!r},) for every layer")
    if kind in MIXERS:
        try:
            MIXERS[kind].check_options(kwargs, num_heads=num_heads)
        except ValueError as error:
            raise ValueError(f"{owner}={kind!r}: {error}") from error
        return
    check_attention_choice(owner, kind, kwargs, causal=True)
    if isinstance(kwargs.get("slopes"), str):
        if attnx.get_attention(kind).name != "lightning":
            raise ValueError(f"{owner}={kind!r}: slopes={kwargs['slopes']!r} is a decay schedule of 'lightning' "
                             f"and 'tnl' layers only")
        check_slopes(owner, kwargs["slopes"], num_heads)


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Shape and options of an `LLM`. Fields default to the `tiny` preset's byte-level model.

    head_dim / mlp_width default (0) to width // num_heads and the Llama rule 8/3 * width rounded up to 64.
    qk_head_dim (0 = head_dim) sizes query/key heads apart from value heads (Based's small feature dimension);
    use_mlp=False drops the feed-forward blocks (Zoology's attention-only MQAR models).
    num_value_heads (0 = num_kv_heads) and query_hidden_dim (0 = none) are Sigma's DiffQKV options (arXiv
    2501.13629 §2, attention 'diffqkv'): value heads counted apart from key heads, and the augmented Q projection.
    layer_attention chooses the token mixer per layer: registered mechanisms or the LLM's `MIXERS` ('tnl',
    'base_conv'), which only it can name (see the module docstring).
    representation_embeddings: DARE's per-layer token-id value tables; parallel_block: BAM's parallel attention +
    FFN block; ffn_experts: {} (dense SwiGLU) or BAM's top-k FFN experts {'num_experts', 'top_k' (2),
    'balance_weight' (0.01)} (all in the module docstring).
    Memory and compile-time knobs (training; decoding is unaffected, the parameter tree is the same either way, so
    checkpoints load across them): remat 'none' saves every activation for the backward pass, 'attention'
    rematerialises each block's token-mixer call (recomputed in the backward pass; the MLP's activations are kept),
    'full' each whole block (only block inputs are kept); scan_layers=True runs the blocks as one lax.scan over
    their stacked parameters (compile time flat in depth), which needs the same mixer in every layer.
    """

    vocab_size: int = 256
    width: int = 128
    depth: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0
    mlp_width: int = 0
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    qk_norm: bool = False
    qk_head_dim: int = 0
    use_mlp: bool = True
    num_value_heads: int = 0
    query_hidden_dim: int = 0
    attention: str = "softmax"
    attention_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    layer_attention: tuple[Any, ...] = ()  # per-layer mixers, repeated over the depth; () = `attention` everywhere
    param_dtype: str = "float32"
    representation_embeddings: bool = False
    parallel_block: bool = False
    ffn_experts: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    remat: Literal["none", "attention", "full"] = "none"
    scan_layers: bool = False

    def __post_init__(self):
        if not isinstance(self.qk_head_dim, int) or self.qk_head_dim < 0:
            raise ValueError(f"LLMConfig.qk_head_dim must be an int >= 0 (0 = head_dim), got {self.qk_head_dim!r}")
        for name in ("num_value_heads", "query_hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"LLMConfig.{name} must be an int >= 0 (0 = off), got {value!r}")
        if self.num_value_heads and self.num_heads % self.num_value_heads:
            raise ValueError(f"LLMConfig.num_heads={self.num_heads} must be a multiple of "
                             f"num_value_heads={self.num_value_heads}")
        if self.num_value_heads and self.num_value_heads != self.num_kv_heads and self.attention not in (
                "diffqkv", "sigma"):
            raise ValueError(f"LLMConfig.num_value_heads={self.num_value_heads} differs from num_kv_heads="
                             f"{self.num_kv_heads}: set attention='diffqkv' (separate key and value head counts)")
        for name in ("vocab_size", "width", "depth", "num_heads", "num_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LLMConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LLMConfig.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if not self.head_dim and self.width % self.num_heads:
            raise ValueError(
                f"LLMConfig.width={self.width} is not divisible by num_heads={self.num_heads}; set head_dim")
        check_param_dtype("LLMConfig", self.param_dtype)
        _check_mixer("LLMConfig", self.attention, self.attention_kwargs, self.num_heads, layer_entry=False)
        self._check_layer_attention()
        self._check_block_options()
        self._check_memory_options()

    def _check_block_options(self) -> None:
        for name in ("representation_embeddings", "parallel_block"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LLMConfig.{name} must be a bool, got {getattr(self, name)!r}")
        try:
            check_ffn_experts(self.ffn_experts)
        except ValueError as error:
            raise ValueError(f"LLMConfig.{error}") from error
        if self.ffn_experts and not self.use_mlp:
            raise ValueError("LLMConfig.ffn_experts replaces the MLP: it needs use_mlp=True")
        if self.parallel_block and not self.use_mlp:
            raise ValueError("LLMConfig.parallel_block=True runs attention and the MLP side by side: it needs "
                             "use_mlp=True")
        if self.representation_embeddings:
            mixers = sorted({kind for layer in range(self.depth) if (kind := self.layer_mixer(layer)[0]) in MIXERS})
            if mixers:
                raise ValueError(f"LLMConfig.representation_embeddings=True feeds the values of attention layers; "
                                 f"layer_attention also has the LLM's own mixers {mixers}, which have no value "
                                 f"table: use registered attention mechanisms only")

    def _check_memory_options(self) -> None:
        if self.remat not in REMAT_CHOICES:
            raise ValueError(f"LLMConfig.remat={self.remat!r}; allowed: {REMAT_CHOICES} ('none' keeps every "
                             f"activation, 'attention' recomputes the token mixers, 'full' whole blocks)")
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"LLMConfig.scan_layers must be a bool, got {self.scan_layers!r}")
        if self.scan_layers:  # one scanned body for every layer: every layer must build the same block
            first = self.layer_mixer(0)
            for layer in range(1, self.depth):
                if self.layer_mixer(layer) != first:
                    raise ValueError(
                        f"LLMConfig.scan_layers=True runs one block body for every layer, but layer_attention="
                        f"{self.layer_attention!r} (with attention={self.attention!r}) gives layer {layer} the "
                        f"mixer {self.layer_mixer(layer)!r} and layer 0 {first!r}; use one mixer with the same "
                        f"options in every layer, or scan_layers=False")

    def _check_layer_attention(self) -> None:
        entries = self.layer_attention
        if isinstance(entries, list):  # a list from Python code; gin gives a tuple
            object.__setattr__(self, "layer_attention", entries := tuple(entries))
        if not isinstance(entries, tuple):
            raise ValueError(f"LLMConfig.layer_attention must be a tuple of entries (repeated over the layers; () = "
                             f"`attention` everywhere), got {entries!r}")
        for index, entry in enumerate(entries):
            if entry is not None:  # None: the top-level attention, checked above
                owner = f"LLMConfig.layer_attention[{index}]"
                kind, kwargs = _entry(owner, entry, self.attention, self.attention_kwargs)
                _check_mixer(owner, kind, kwargs, self.num_heads, layer_entry=True)

    def layer_mixer(self, layer: int) -> tuple[str, dict[str, Any]]:
        """(name, kwargs) of layer `layer`'s token mixer, with `slopes` resolved to the layer's floats."""
        if not 0 <= layer < self.depth:
            raise ValueError(f"LLMConfig.layer_mixer: layer must be in [0, depth={self.depth}), got {layer!r}")
        if not self.layer_attention:
            kind, kwargs = self.attention, dict(self.attention_kwargs)
        else:
            entry = self.layer_attention[layer % len(self.layer_attention)]
            kind, kwargs = _entry("LLMConfig.layer_attention", entry, self.attention, self.attention_kwargs)
        if kind == "tnl" or (kind not in MIXERS and attnx.get_attention(kind).name == "lightning"):
            if kwargs.get("slopes") is not None:
                kwargs["slopes"] = resolve_slopes(kwargs["slopes"], self.num_heads, layer, self.depth)
        return kind, kwargs

    def layer_config(self, layer: int) -> "LLMConfig":
        """The config block `layer` is built from: for an attention layer, this config with that layer's `attention`,
        `attention_kwargs` and `qk_head_dim` and no layer_attention; for a `MIXERS` layer (built from
        `layer_mixer`), this config, whose norms and MLP the block still uses."""
        kind, kwargs = self.layer_mixer(layer)
        if kind in MIXERS:
            return self
        qk_head_dim = kwargs.pop("qk_head_dim", self.qk_head_dim)
        if (kind, kwargs, qk_head_dim) == (self.attention, dict(self.attention_kwargs), self.qk_head_dim) \
                and not self.layer_attention:
            return self
        return dataclasses.replace(self, attention=kind, attention_kwargs=kwargs, qk_head_dim=qk_head_dim,
                                   layer_attention=())

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.width // self.num_heads

    @property
    def resolved_mlp_width(self) -> int:
        if self.mlp_width:
            return self.mlp_width
        return -(-(8 * self.width // 3) // 64) * 64


PRESETS: dict[str, LLMConfig] = {
    # Byte-level model small enough to train in minutes on a laptop CPU (the quickstart).
    "tiny": LLMConfig(),
    # The fixed shape of bench/train_step.py (vocab 256, width 256, 4 layers, 4 heads).
    "bench": LLMConfig(width=256, depth=4, num_heads=4, num_kv_heads=4, mlp_width=768, tie_embeddings=False),
    "125m": LLMConfig(vocab_size=50304, width=768, depth=12, num_heads=12, num_kv_heads=12),
    "350m": LLMConfig(vocab_size=50304, width=1024, depth=24, num_heads=16, num_kv_heads=16),
    "1b": LLMConfig(vocab_size=128256, width=2048, depth=16, num_heads=32, num_kv_heads=8, mlp_width=8192,
                    rope_theta=500_000.0, norm_eps=1e-5),
}


def llm_config(preset: str = "tiny", **overrides: Any) -> LLMConfig:
    """Returns the named preset with `overrides` applied, e.g. `llm_config("tiny", depth=2)`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown LLM preset {preset!r}; known presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


class DecoderBlock(nnx.Module):
    """Pre-norm residual block: x + attention(norm(x)), then + mlp(norm(x)); with config.parallel_block
    x + attention(norm(x)) + mlp(norm(x)) from the one norm (BAM)."""

    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs, mixer: nnx.Module | None = None):
        dtype = PARAM_DTYPES[config.param_dtype]
        self.attention_norm = RMSNorm(config.width, eps=config.norm_eps, param_dtype=dtype)
        self.attention = mixer if mixer is not None else Attention(
            config.width,
            config.num_heads,
            config.num_kv_heads,
            config.resolved_head_dim,
            kind=config.attention,
            kind_kwargs=config.attention_kwargs,
            causal=True,
            rope_theta=config.rope_theta,
            qk_norm=config.qk_norm,
            qk_head_dim=config.qk_head_dim or None,
            num_value_heads=config.num_value_heads or None,
            query_hidden_dim=config.query_hidden_dim or None,
            value_vocab=config.vocab_size if config.representation_embeddings else None,
            rngs=rngs,
            param_dtype=dtype,
        )
        self.parallel = config.parallel_block
        self.remat_attention = config.remat == "attention"
        self.mlp_norm = RMSNorm(config.width, eps=config.norm_eps, param_dtype=dtype) \
            if config.use_mlp and not config.parallel_block else None
        if not config.use_mlp:
            self.mlp = None
        elif config.ffn_experts:
            self.mlp = ExpertSwiGLU(config.width, config.resolved_mlp_width, rngs=rngs, param_dtype=dtype,
                                    **config.ffn_experts)
        else:
            self.mlp = SwiGLU(config.width, config.resolved_mlp_width, rngs=rngs, param_dtype=dtype)

    def __call__(self, x: jax.Array, positions: jax.Array | None = None,
                 token_ids: jax.Array | None = None) -> jax.Array:
        """token_ids [B, T]: for the representation tables only (mixers keep their two-argument call)."""
        normed = self.attention_norm(x)
        ids = {} if token_ids is None else {"token_ids": token_ids}
        if self.remat_attention:  # LLMConfig.remat='attention': the backward pass recomputes the mixer call
            mixed = checkpointed_call(self.attention, _mix, normed, x, positions, ids)
        else:
            mixed = _mix(self.attention, normed, x, positions, ids)
        return self._add_mlp(x, normed, mixed)

    def decode(self, x: jax.Array, cache: KVCache, cache_index: jax.Array,
               token_ids: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        normed = self.attention_norm(x)
        ids = {} if token_ids is None else {"token_ids": token_ids}
        with residual_stream(x):
            mixed, cache = self.attention.decode(normed, cache, cache_index, **ids)
        return self._add_mlp(x, normed, mixed), cache

    def _add_mlp(self, x: jax.Array, normed: jax.Array, mixed: jax.Array) -> jax.Array:
        if self.mlp is None:
            return x + mixed
        if self.parallel:  # BAM: both branches read the same normalised input
            return x + mixed + self.mlp(normed)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x))


def _mix(mixer: nnx.Module, normed: jax.Array, residual: jax.Array, positions: jax.Array | None,
         ids: dict[str, jax.Array]) -> jax.Array:
    """A block's token-mixer call. The residual stream is an argument (not closed over), so that under
    remat='attention' it is an input of the rematerialised call, published inside it for routers that read it
    (VAR's sink detector)."""
    with residual_stream(residual):
        return mixer(normed, positions, **ids)


def _block(config: LLMConfig, layer: int, rngs: nnx.Rngs) -> DecoderBlock:
    """Block `layer`: the shared attention layer, or one of `MIXERS` in its place (built first, so that its weights
    are drawn where the attention layer's would be)."""
    kind, kwargs = config.layer_mixer(layer)
    mixer = None
    if kind in MIXERS:
        mixer = MIXERS[kind](
            config.width, config.num_heads, config.num_kv_heads, config.resolved_head_dim, layer_index=layer,
            num_layers=config.depth, norm_eps=config.norm_eps, rngs=rngs,
            param_dtype=PARAM_DTYPES[config.param_dtype], **kwargs)
    return DecoderBlock(config.layer_config(layer), rngs=rngs, mixer=mixer)


class LLM(nnx.Module):
    """Token ids [B, T] -> next-token logits [B, T, vocab] (float32)."""

    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs):
        self.tie_embeddings = config.tie_embeddings  # not the config itself: its dict field is unhashable
        self.representation_embeddings = config.representation_embeddings
        dtype = PARAM_DTYPES[config.param_dtype]
        self.embed = Embed(config.vocab_size, config.width, rngs=rngs, param_dtype=dtype)
        self.blocks = nnx.List([_block(config, layer, rngs) for layer in range(config.depth)])
        self.full_remat = config.remat == "full"  # 'attention' is the blocks' own option
        self.scan_layers = config.scan_layers
        if config.scan_layers:
            check_identical_blocks(self.blocks, "LLMConfig.scan_layers=True")
        self.final_norm = RMSNorm(config.width, eps=config.norm_eps, param_dtype=dtype)
        if not config.tie_embeddings:
            init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
            self.unembed_dv = nnx.Param(init(rngs.params(), (config.width, config.vocab_size), dtype))

    def __call__(self, token_ids: jax.Array, positions: jax.Array | None = None, *,
                 attention_inputs: Mapping[str, Any] | None = None) -> jax.Array:
        """attention_inputs: run-time kwargs (arrays) for the layers whose mechanism takes them through its
        `RunTimeInputs` router, e.g. {'local_tokens': bool [B, S], ...} for 'head_modulation' (per-image token sets);
        None (default) is the configured model."""
        return self.logits(self.features(token_ids, positions, attention_inputs=attention_inputs))

    def features(self, token_ids: jax.Array, positions: jax.Array | None = None, *,
                 attention_inputs: Mapping[str, Any] | None = None) -> jax.Array:
        """The last block's output [B, T, D] before the final norm: `logits(features(t)) == model(t)`. Tasks that
        score a few positions (MQAR) gather those rows first and skip the vocabulary projection of the rest."""
        x = self.embed(token_ids)
        ids = {"token_ids": token_ids} if self.representation_embeddings else {}
        def run_block(block: DecoderBlock, x: jax.Array) -> jax.Array:
            # The residual stream: batch over data x fsdp, tokens over sequence, width whole.
            return block(constrain(x, "btd"), positions, **ids)

        with self._run_time_inputs(attention_inputs):
            if self.scan_layers:  # LLMConfig.scan_layers: one lax.scan over the stacked block states
                x = scan_blocks(list(self.blocks), run_block, x, remat=self.full_remat,
                                owner="LLMConfig.scan_layers=True")
            else:
                for block in self.blocks:  # LLMConfig.remat='full': only each block's input is kept
                    x = checkpointed_call(block, run_block, x) if self.full_remat else run_block(block, x)
        return constrain(x, "btd")

    def init_cache(self, batch_size: int, length: int) -> list[KVCache]:
        """An empty KV cache of `length` positions per layer, in the parameters' dtype."""
        dtype = self.embed.embedding_vd.dtype
        return [block.attention.init_cache(batch_size, length, dtype) for block in self.blocks]

    def decode(self, token_ids: jax.Array, cache: list[KVCache], cache_index: jax.Array, *,
               attention_inputs: Mapping[str, Any] | None = None) -> tuple[jax.Array, list[KVCache]]:
        """Logits [B, T, vocab] of the tokens at positions cache_index .. cache_index + T - 1, given the cache of
        everything before them; returns the cache with these tokens added. Equal to the matching rows of
        `__call__` on the whole sequence (tested), with the same `attention_inputs`."""
        x = self.embed(token_ids)
        ids = {"token_ids": token_ids} if self.representation_embeddings else {}
        new_cache = []
        with self._run_time_inputs(attention_inputs):
            for block, layer_cache in zip(self.blocks, cache):
                x, layer_cache = block.decode(x, layer_cache, cache_index, **ids)
                new_cache.append(layer_cache)
        return self.logits(x), new_cache

    def _run_time_inputs(self, attention_inputs: Mapping[str, Any] | None):
        """Checks that some layer reads `attention_inputs`, then publishes them to the layers' routers for the
        duration of a `with` block (`features` and `decode`)."""
        check_attention_inputs([block.attention for block in self.blocks], attention_inputs)
        return publish_attention_inputs(None if attention_inputs is None else dict(attention_inputs))

    def logits(self, x: jax.Array) -> jax.Array:
        """Features [..., D] -> next-token logits [..., vocab] (float32)."""
        x = self.final_norm(x)
        if self.tie_embeddings:
            logits = self.embed.attend(x)
        else:
            logits = jnp.einsum("...d,dv->...v", x, self.unembed_dv[...])
        logits = constrain(logits, "btv") if logits.ndim == 3 else logits
        return logits.astype(jnp.float32)
