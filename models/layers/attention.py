"""The NNX attention layer: owns the projections and calls a pure attention function from `attnx` by name.

Layout follows the attnx contract (ARCHITECTURE §4): query [B, T, N, H], key/value [B, S, K, H]. Grouped-query
attention (K < N) is passed through as is; key/value heads are never repeated here.

One layer serves the three families: the LLM (rotary positions, no biases, optional QK-norm, a KV cache for
decoding), ViT and DiT (no rotary positions, biases on every projection, non-causal).

Probing (attnx.analysis, `python -m train.analyze`), off by default and outside the parameter tree:
- `capture_attention_probabilities(model, *args)` runs the model with every plain-softmax layer sowing its attention
  map [B, N, T, S] (an `nnx.Intermediate` named "attention_probs", computed by the reference softmax formula from the
  layer's own rotated queries and keys) and returns (output, {layer path: map}).
- `set_head_masks(model, masks)` gives every layer a per-head multiplier [N] on the head outputs before the output
  projection (circuit-style head ablation; the hook VHR and MoH scale heads at); `masks=None` removes them.
"""

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

import attnx
from models.layers.mixers import ROUTERS, SPATIAL_MIXERS
from models.layers.norm import RMSNorm
from models.layers.rope import rotary_embedding
from models.layers.sharding import constrain

# {"key": [B, L, K, H], "value": [B, L, K, V]}; slot j holds position j (mechanisms with a CacheRule keep their own)
KVCache = dict[str, jax.Array]

PROBS_NAME = "attention_probs"  # the sown intermediate's name
_CAPTURE_PROBS = contextvars.ContextVar("attnx_capture_attention_probs", default=False)


class HeadMask(nnx.Variable):
    """A per-head multiplier [N] on an attention layer's head outputs (not a parameter: optimisers and checkpoints
    of nnx.Param never see it)."""


def resolve_attention(kind: str, *, causal: bool) -> Callable[..., jax.Array]:
    """Returns `fn(query, key, value, **kwargs)` for the mechanism registered under `kind` in attnx.

    Unknown names raise the registry's ValueError, which lists the known ones; a mechanism that does not support
    self attention with the requested causality (CAB pattern "CS" or "NS") is rejected here, at construction.
    """
    spec = attnx.get_attention(kind)
    pattern = "CS" if causal else "NS"
    if not spec.supports(pattern):
        supporting = [name for name in attnx.list_attentions() if attnx.get_attention(name).supports(pattern)]
        raise ValueError(f"attention {kind!r} does not support {'causal' if causal else 'non-causal'} self "
                         f"attention (pattern {pattern}); it supports {sorted(spec.patterns)}. Mechanisms that "
                         f"support {pattern}: {supporting}")
    return lambda query, key, value, **kwargs: spec.fn(query, key, value, causal=causal, **kwargs)


def check_attention_choice(owner: str, attention: str, attention_kwargs: Any, *, causal: bool) -> None:
    """A model config's `attention` / `attention_kwargs`: unknown names and mechanisms without the family's pattern
    fail here, at construction, with the field named (e.g. "LLMConfig.attention='x': ...")."""
    if not isinstance(attention_kwargs, Mapping):
        raise ValueError(f"{owner}.attention_kwargs must be a dict, got {attention_kwargs!r}")
    try:
        resolve_attention(attention, causal=causal)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{owner}.attention={attention!r}: {error}") from error


def resolve_decode(kind: str) -> Callable[..., jax.Array]:
    """The mechanism's cached-decode rule (`AttentionSpec.decode`); a clear error when it has none."""
    spec = attnx.get_attention(kind)
    if spec.decode is None and spec.cache is None:
        with_decode = [name for name in attnx.list_attentions()
                       if attnx.get_attention(name).decode is not None or attnx.get_attention(name).cache is not None]
        raise NotImplementedError(f"attention {kind!r} has no KV-cache decode rule yet, so generate() cannot use it; "
                                  f"mechanisms with one: {with_decode}")
    return spec.decode


def layer_entry(owner: str, entries: tuple, layer: int, attention: str,
                attention_kwargs: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """(name, kwargs) of block `layer` under a per-block pattern `entries`, repeated over the depth (block l takes
    entry l % len; an empty pattern gives every block `attention`). An entry is None (the default attention and
    kwargs), a mechanism name (no kwargs), or (name, kwargs dict)."""
    if not entries:
        return attention, attention_kwargs
    entry = entries[layer % len(entries)]
    if entry is None:
        return attention, attention_kwargs
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str) \
            and isinstance(entry[1], Mapping):
        return entry[0], entry[1]
    raise ValueError(f"{owner} entry {entry!r}: expected None (the config's attention), a mechanism name, or "
                     f"(name, kwargs dict)")


def token_mixer(width: int, num_heads: int, *, attention: str, attention_kwargs: Mapping[str, Any],
                grid: tuple[int, ...], qk_norm: bool = False, qkv_bias: bool = True, rngs: nnx.Rngs,
                param_dtype=jnp.float32) -> nnx.Module:
    """The token mixer of a ViT or DiT block: non-causal self attention over tokens laid out on `grid`.

    Mechanisms whose computation the shared projections cannot express (HiLo's per-branch projections, TransNeXt's
    pooled branch, ...) replace the whole layer with their `SPATIAL_MIXERS` module, built as
    `module(width, num_heads, grid=, use_bias=True, rngs=, param_dtype=, **attention_kwargs)` and called as
    `module(x [B, T, D]) -> [B, T, D]`; every other mechanism runs in the shared `Attention` layer. qkv_bias=False
    drops the shared layer's query/key/value biases (the output projection keeps its bias, as timm's qkv_bias=False);
    a SPATIAL_MIXERS module owns its projections and refuses it.
    """
    name = attnx.get_attention(attention).name
    if name in SPATIAL_MIXERS:
        if not qkv_bias:
            raise ValueError(f"qkv_bias=False applies to the shared attention layer; {name!r} replaces the whole "
                             f"layer with its own projections (SPATIAL_MIXERS); use qkv_bias=True")
        return SPATIAL_MIXERS[name](width, num_heads, grid=tuple(grid), use_bias=True, rngs=rngs,
                                    param_dtype=param_dtype, **dict(attention_kwargs))
    return Attention(width, num_heads, num_heads, width // num_heads, kind=attention, kind_kwargs=attention_kwargs,
                     causal=False, use_rope=False, use_bias=True, qkv_bias=qkv_bias, qk_norm=qk_norm, grid=grid,
                     rngs=rngs, param_dtype=param_dtype)


class Attention(nnx.Module):
    """Multi-head self-attention with grouped-query heads and a pluggable mixer `kind`.

    kind_kwargs: forwarded to the attention function on every call (e.g. `{"window": 64}`).
    use_rope: rotate queries and keys by their positions (RoFormer); ViT/DiT use absolute position embeddings
        instead. use_bias: biases on the query/key/value/output projections (ViT, DiT). qkv_bias: the query/key/value
        biases apart (None: as use_bias; False with use_bias keeps only the output bias, timm's qkv_bias=False).
        qk_norm: RMS-normalise each query and key head before attention (Dehghani et al., 2023, "Scaling Vision
        Transformers to 22B Parameters", §3.1), which keeps logits bounded at scale. qk_head_dim: a query/key head
        size other than the value head size `head_dim` (Based projects queries and keys to 16 features, values keep
        the full size).
    num_value_heads: value heads counted apart from the key heads `num_kv_heads` (Sigma's DiffQKV, arXiv
        2501.13629 §2; kind 'diffqkv'); default num_kv_heads. query_hidden_dim: Sigma's augmented Q, the query
        projection factored through a wider hidden width, q = (x W_Q1) W_Q2 with W_Q1: D -> query_hidden_dim (the
        paper gives no nonlinearity between them, so none is used).
    value_vocab: DARE's decoupled representation embeddings (Feng et al., 2024, "Long-Sequence Recommendation
        Models Need Decoupled Embeddings", arXiv 2410.02604, §4; thuml/DARE `model/din_pytorch.py`): the values
        are rows of a token-id table [value_vocab, value heads, head_dim] instead of a projection of x, so that
        queries and keys (the attention stream, from x) and values (the representation stream) come from separate
        embeddings; the layer is then called with `token_ids`. As in the code, the table's rows are the values
        themselves (no projection after the lookup). None (default): the usual value projection.
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        kind: str = "softmax",
        kind_kwargs: Mapping[str, Any] | None = None,
        causal: bool = True,
        use_rope: bool = True,
        rope_theta: float = 10_000.0,
        use_bias: bool = False,
        qkv_bias: bool | None = None,
        qk_norm: bool = False,
        qk_head_dim: int | None = None,
        num_value_heads: int | None = None,
        query_hidden_dim: int | None = None,
        grid: tuple[int, ...] | None = None,
        value_vocab: int | None = None,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
    ):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        resolve_attention(kind, causal=causal)  # fail at construction, not at the first call
        num_value_heads = num_kv_heads if num_value_heads is None else num_value_heads
        if num_value_heads != num_kv_heads and attnx.get_attention(kind).name != "diffqkv":
            raise ValueError(f"num_value_heads={num_value_heads} differs from num_kv_heads={num_kv_heads}: only "
                             f"attention 'diffqkv' reads separate key and value head counts, got {kind!r}")
        if num_value_heads < 1 or num_heads % num_value_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_value_heads={num_value_heads}")
        if value_vocab is not None and (not isinstance(value_vocab, int) or isinstance(value_vocab, bool)
                                        or value_vocab < 1):
            raise ValueError(f"value_vocab must be a positive vocabulary size or None, got {value_vocab!r}")
        if query_hidden_dim is not None and query_hidden_dim < 1:
            raise ValueError(f"query_hidden_dim must be a positive width or None, got {query_hidden_dim!r}")
        kind_kwargs = dict(kind_kwargs or {})
        spec = attnx.get_attention(kind)
        spatial = spec.spatial
        if isinstance(kind_kwargs.get("core"), str):  # a mechanism around a core (MoH): the core must fit too
            resolve_attention(kind_kwargs["core"], causal=causal)
            spatial = spatial or attnx.get_attention(kind_kwargs["core"]).spatial
        if grid is not None:
            grid = tuple(grid)
            if not grid or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid):
                raise ValueError(f"Attention: grid must be a tuple of positive ints (the token layout), got {grid!r}")
        # Passed on only to mechanisms that read it, so that the others keep their exact signatures.
        self.grid = grid if spatial else None
        self.kind = kind
        # Stored as sorted pairs: module attributes are static graph metadata and must be hashable for jit.
        self.kind_kwargs = tuple(sorted(kind_kwargs.items()))
        self.causal = causal
        self.use_rope = use_rope
        self.rope_theta = rope_theta
        in_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2))
        out_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
        qk_dim = qk_head_dim or head_dim
        if query_hidden_dim is None:
            self.query_hidden_da = None
            self.query_dnh = nnx.Param(in_init(rngs.params(), (width, num_heads, qk_dim), param_dtype))
        else:  # augmented Q: both factors fan-in scaled, so the query keeps the plain projection's variance
            hidden_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
            self.query_hidden_da = nnx.Param(hidden_init(rngs.params(), (width, query_hidden_dim), param_dtype))
            self.query_dnh = nnx.Param(in_init(rngs.params(), (query_hidden_dim, num_heads, qk_dim), param_dtype))
        self.key_dkh = nnx.Param(in_init(rngs.params(), (width, num_kv_heads, qk_dim), param_dtype))
        if value_vocab is None:
            self.value_dkh = nnx.Param(in_init(rngs.params(), (width, num_value_heads, head_dim), param_dtype))
            self.value_table_vkh = None
        else:  # unit-variance rows: the scale a fan-in projection of the normalised x gives the values
            self.value_dkh = None
            self.value_table_vkh = nnx.Param(nnx.initializers.normal(1.0)(
                rngs.params(), (value_vocab, num_value_heads, head_dim), param_dtype))
        self.out_nhd = nnx.Param(out_init(rngs.params(), (num_heads, head_dim, width), param_dtype))
        zeros = lambda *shape: nnx.Param(jnp.zeros(shape, param_dtype))
        qkv_bias = use_bias if qkv_bias is None else qkv_bias
        self.query_bias_nh = zeros(num_heads, qk_dim) if qkv_bias else None
        self.key_bias_kh = zeros(num_kv_heads, qk_dim) if qkv_bias else None
        self.value_bias_kh = zeros(num_value_heads, head_dim) if qkv_bias else None
        self.out_bias_d = zeros(width) if use_bias else None
        self.query_norm = RMSNorm(qk_dim, param_dtype=param_dtype) if qk_norm else None
        self.key_norm = RMSNorm(qk_dim, param_dtype=param_dtype) if qk_norm else None
        # Last, so a routed layer draws the same projections as a plain one from the same seed.
        router = ROUTERS.get(spec.name)
        layout = {"grid": self.grid} if spec.spatial else {}
        self.router = router(width, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, qk_head_dim=qk_dim,
                             rngs=rngs, param_dtype=param_dtype, **layout, **kind_kwargs) if router else None

    def project(self, x: jax.Array, positions: jax.Array | None = None,
                token_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D] -> query [B, T, N, H], key [B, T, K, H], value [B, T, K, V], biased, normalised, rotated."""
        return self.rotate(*self.project_heads(x, token_ids), positions)

    def project_heads(self, x: jax.Array, token_ids: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D] -> query, key, value heads, biased and normalised but not yet rotated. With a
        representation table (value_vocab) the values are its rows of `token_ids` [B, T]."""
        hidden = x if self.query_hidden_da is None else x @ self.query_hidden_da[...]
        query = jnp.einsum("btd,dnh->btnh", hidden, self.query_dnh[...])
        key = jnp.einsum("bsd,dkh->bskh", x, self.key_dkh[...])
        if self.value_table_vkh is None:
            value = jnp.einsum("bsd,dkh->bskh", x, self.value_dkh[...])
        elif token_ids is None or tuple(jnp.shape(token_ids)) != x.shape[:2]:
            raise ValueError(f"Attention with a representation table (value_vocab) needs token_ids [B, T] = "
                             f"{x.shape[:2]} for its values, got {None if token_ids is None else jnp.shape(token_ids)}")
        else:
            value = jnp.take(self.value_table_vkh[...], token_ids, axis=0)
        if self.query_bias_nh is not None:
            query = query + self.query_bias_nh[...]
            key = key + self.key_bias_kh[...]
            value = value + self.value_bias_kh[...]
        if self.query_norm is not None:
            query, key = self.query_norm(query), self.key_norm(key)
        return query, key, value

    def rotate(self, query: jax.Array, key: jax.Array, value: jax.Array,
               positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Rotary positions on query and key (identity when the layer has none); positions default to 0..T-1."""
        if self.use_rope:
            if positions is None:
                positions = jnp.arange(query.shape[1])
            renumber = attnx.get_attention(self.kind).rotary_positions
            if renumber is not None:  # e.g. CCA's concentric image positions
                positions = renumber(positions, **dict(self.kind_kwargs))
            query = rotary_embedding(query, positions, theta=self.rope_theta)
            key = rotary_embedding(key, positions, theta=self.rope_theta)
        return query, key, value

    def output(self, mixed: jax.Array) -> jax.Array:
        head_mask = getattr(self, "head_mask", None)
        if head_mask is not None:  # before the output projection: o_h <- m_h o_h
            if mixed.ndim != 4 or mixed.shape[2] != head_mask[...].shape[0]:
                raise ValueError(f"Attention.head_mask: a [N] = [{head_mask[...].shape[0]}] mask needs head outputs "
                                 f"[B, T, N, V], got {mixed.shape}")
            mixed = (mixed * head_mask[...].astype(mixed.dtype)[:, None]).astype(mixed.dtype)
        out = jnp.einsum("btnh,nhd->btd", mixed, self.out_nhd[...])
        return out if self.out_bias_d is None else out + self.out_bias_d[...]

    def __call__(self, x: jax.Array, positions: jax.Array | None = None,
                 token_ids: jax.Array | None = None) -> jax.Array:
        """x [B, T, D] -> [B, T, D]; `positions` [B, T] or [T] (rotary only) default to 0..T-1; token_ids [B, T]
        index the representation table (value_vocab layers only)."""
        heads = self.project_heads(x, token_ids)
        query, key, value = self.rotate(*heads, positions)
        # Megatron-style: heads split over the tensor axis from the column-parallel projections on, until the
        # row-parallel output projection sums them (a constraint is a no-op without a mesh and rules in context).
        query, key, value = constrain(query, "btnh"), constrain(key, "bskh"), constrain(value, "bskh")
        attention_fn = resolve_attention(self.kind, causal=self.causal)  # by name: keeps the graph def hashable
        mixed = attention_fn(query, key, value, **self._call_kwargs(x, *heads[:2]))
        if _CAPTURE_PROBS.get() and hasattr(self, "__captures__") and self.has_softmax_map():
            self.sow(nnx.Intermediate, PROBS_NAME, self._softmax_map(query, key),
                     reduce_fn=lambda _, new: new, init_fn=lambda: None)
        return self.output(constrain(mixed, "btnh") if mixed.ndim == 4 else mixed)

    def _call_kwargs(self, x: jax.Array, query: jax.Array, key: jax.Array) -> dict[str, Any]:
        """The configured attention kwargs plus those of the mechanism's own weights (ROUTERS), which see the layer
        input and the query/key heads before rotary positions."""
        kwargs = dict(self.kind_kwargs)
        if self.grid is not None:
            kwargs["grid"] = self.grid
        if self.router is not None:
            kwargs.update(self.router(x, query, key))
        return kwargs

    # ---- Decoding with a KV cache ----

    def init_cache(self, batch_size: int, length: int, dtype=jnp.float32) -> KVCache:
        """An empty cache for `length` positions (or the mechanism's own, e.g. StreamingLLM's bounded one)."""
        _, num_kv_heads, qk_dim = self.key_dkh.shape
        values = self.value_dkh if self.value_table_vkh is None else self.value_table_vkh
        _, num_value_heads, value_dim = values.shape  # DiffQKV: the two caches differ in heads too
        rule = attnx.get_attention(self.kind).cache
        if rule is not None:
            return rule.init(batch_size, length, (num_kv_heads, qk_dim), (num_value_heads, value_dim), dtype,
                             **dict(self.kind_kwargs))
        return {"key": jnp.zeros((batch_size, length, num_kv_heads, qk_dim), dtype),
                "value": jnp.zeros((batch_size, length, num_value_heads, value_dim), dtype)}

    def decode(self, x: jax.Array, cache: KVCache, cache_index: jax.Array,
               token_ids: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """x [B, T, D] holds the tokens at positions cache_index .. cache_index + T - 1 (a traced int32 scalar).

        Their keys and values are written into the cache; each query attends to every cached position up to its
        own through the mechanism's decode rule. Returns (out [B, T, D], updated cache).
        """
        if not self.causal:
            raise ValueError("decode: a KV cache serves causal attention only")
        positions = cache_index + jnp.arange(x.shape[1], dtype=jnp.int32)
        heads = self.project_heads(x, token_ids)
        rule = attnx.get_attention(self.kind).cache
        if rule is not None:  # the mechanism keeps its own cache and places rotary positions itself
            rope_theta = self.rope_theta if self.use_rope else None
            mixed, cache = rule.decode(*heads, cache, cache_index, rope_theta=rope_theta,
                                       **self._call_kwargs(x, *heads[:2]))
            return self.output(mixed), cache
        query, key, value = self.rotate(*heads, positions)
        start = (0, cache_index, 0, 0)
        cache = {"key": jax.lax.dynamic_update_slice(cache["key"], key.astype(cache["key"].dtype), start),
                 "value": jax.lax.dynamic_update_slice(cache["value"], value.astype(cache["value"].dtype), start)}
        decode_fn = resolve_decode(self.kind)
        mixed = decode_fn(query, cache["key"].astype(query.dtype), cache["value"].astype(query.dtype),
                          query_positions=positions, **self._call_kwargs(x, *heads[:2]))
        return self.output(mixed), cache

    # ---- Probing ----

    def attention_probabilities(self, x: jax.Array, positions: jax.Array | None = None,
                                token_ids: jax.Array | None = None) -> jax.Array:
        """The softmax attention map [B, N, T, T] of this layer's input, for probing (softmax mixers only).

        Other mechanisms do not form a single softmax map (or form it differently), so they raise rather than
        return a map that is not what the model computes.
        """
        if not self.has_softmax_map():
            raise NotImplementedError(f"attention_probabilities: only plain 'softmax' layers have a softmax map to "
                                      f"show; this layer is {self.kind!r} with {dict(self.kind_kwargs)}")
        query, key, _ = self.project(x, positions, token_ids)
        return self._softmax_map(query, key)

    def has_softmax_map(self) -> bool:
        """Whether the layer computes one plain softmax map (the 'softmax' mechanism without options)."""
        return attnx.get_attention(self.kind).name == "softmax" and not self.kind_kwargs and self.router is None

    def _softmax_map(self, query: jax.Array, key: jax.Array) -> jax.Array:
        """softmax(q k^T / sqrt(H)) [B, N, T, S] in float32 from rotated heads, causal when the layer is."""
        num_heads, num_kv_heads = query.shape[2], key.shape[2]
        key = jnp.repeat(key, num_heads // num_kv_heads, axis=2)  # probing only: clarity over memory
        logits = jnp.einsum("btnh,bsnh->bnts", query, key).astype(jnp.float32) * query.shape[-1] ** -0.5
        if self.causal:
            length = query.shape[1]
            logits = jnp.where(jnp.tril(jnp.ones((length, length), bool)), logits, -jnp.inf)
        return jax.nn.softmax(logits, axis=-1)


def attention_layers(model: nnx.Module) -> list[tuple[str, Attention]]:
    """(dotted path, layer) of every shared `Attention` layer of `model`, in module-tree order (blocks.0 first)."""
    layers = [(".".join(map(str, path)), node) for path, node in nnx.iter_graph(model) if isinstance(node, Attention)]
    return sorted(layers, key=lambda item: [int(p) if p.isdigit() else p for p in item[0].split(".")])


def set_head_masks(model: nnx.Module, masks) -> None:
    """Gives the model's attention layers (`attention_layers` order) per-head multipliers masks[l] [N] (an [L, N]
    array or a sequence of [N] arrays); masks=None removes them (the default computation)."""
    layers = attention_layers(model)
    if masks is None:
        for _, layer in layers:
            if getattr(layer, "head_mask", None) is not None:
                del layer.head_mask
        return
    if len(masks) != len(layers):
        raise ValueError(f"set_head_masks.masks: expected one [N] mask per attention layer ({len(layers)}: "
                         f"{[name for name, _ in layers]}), got {len(masks)}")
    for (name, layer), mask in zip(layers, masks):
        mask = jnp.asarray(mask, jnp.float32)
        num_heads = layer.out_nhd.shape[0]
        if mask.shape != (num_heads,):
            raise ValueError(f"set_head_masks.masks: layer {name} has {num_heads} heads, expected a mask of shape "
                             f"({num_heads},), got {mask.shape}")
        layer.head_mask = HeadMask(mask)


@contextlib.contextmanager
def _capturing() -> Iterator[None]:
    token = _CAPTURE_PROBS.set(True)
    try:
        yield
    finally:
        _CAPTURE_PROBS.reset(token)


def capture_attention_probabilities(model: nnx.Module, *args, **kwargs) -> tuple[Any, dict[str, jax.Array]]:
    """(model(*args, **kwargs), {layer path: softmax map [B, N, T, S]}) for every plain-softmax `Attention` layer
    the call runs (other mechanisms form no single softmax map and are left out). Works under jit; the model itself
    is not modified (a merged copy is run, as `call_with_auxiliary_loss` does)."""
    graphdef, state = nnx.split(model)
    with _capturing():
        output, intermediates = nnx.capture(nnx.merge(graphdef, state), nnx.Intermediate)(*args, **kwargs)
    maps = {}
    for path, variable in nnx.to_flat_state(intermediates):
        if path and path[-1] == PROBS_NAME:
            maps[".".join(map(str, path[:-1]))] = variable.get_value()
    order = lambda name: [int(p) if p.isdigit() else p for p in name.split(".")]
    return output, dict(sorted(maps.items(), key=lambda item: order(item[0])))
