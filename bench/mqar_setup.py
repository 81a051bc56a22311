"""The MQAR benchmark's models and optimizer (`bench/tasks.py mqar`): the grid's mechanisms, the Budget, Zoology's
weight initialisation and positional scheme, and the width-scaled (muP) learning rates. The protocol, grid and
table live in bench/tasks.py; the reasons for each choice are in its docstring and bench/RESULTS.md."""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from models.llm import LLM, LLMConfig
from train.data.mqar import IGNORE

CELLS = ((64, 4), (128, 8), (256, 16))
# final_norm_gain: the final norm's initial gain, 1 or sqrt(d_model) (Zoology's initial logit scale, see
# zoology_init), picked per mechanism from a d_model 64 probe of each at the grid's budget and seed, as Zoology picks
# each model's best learning rate (bench/RESULTS.md: with 1 / sqrt, softmax 96.5 / 32.0% at T = 64, sliding window
# 0.4 / 78.8%, based 69.2 / 99.7%, lightning 9.9 / 24.9%, performer 2.3 / 22.2%, moh 95.9 / 99.8%).
MECHANISMS = {
    "softmax": dict(),
    "sliding_window": dict(attention_kwargs={"window": 16}, final_norm_gain="sqrt"),
    # The linear-attention mechanisms train through their quadratic view ("reference"; tested equal to the chunked
    # one): at T <= 256 it is several times faster on CPU, and Zoology trains Based the same way (train_view
    # "quadratic").
    # Zoology's Fig. 2 "based" model is Hybrid[BaseConv, Based]: layer 0 a gated short convolution (k = 3), layer 1
    # Taylor linear attention; the convolution is what moves a key next to its value.
    "based": dict(qk_head_dim=16, attention_kwargs={"implementation": "reference"},
                  layer_attention=(("base_conv", {"kernel_size": 3}), None), final_norm_gain="sqrt"),
    # Lightning as its authors use it: TransNormerLLM's token mixer (the official `tnl_attn.py` module: SiLU q/k/v,
    # Lightning attention with the per-layer decay, SRMSNorm on the output, sigmoid output gate). Zoology has no
    # Lightning baseline; its linear attentions (zoology/mixers/based.py) normalise by the feature sum instead. The
    # bare `lightning` function has neither a normaliser nor a norm, and did not learn MQAR at all (1.6%).
    "lightning": dict(layer_attention=(("tnl", {"slopes": "tnl"}),), final_norm_gain="sqrt"),
    "performer": dict(attention_kwargs={"num_features": 64, "implementation": "reference"}, final_norm_gain="sqrt"),
    "moh": dict(num_heads=4, num_kv_heads=4, attention_kwargs={"n_shared": 1, "top_k": 2}, final_norm_gain="sqrt"),
}


@dataclasses.dataclass(frozen=True)
class Budget:
    """One training run: at most `steps` optimizer steps, stopping early once every cell's held-out accuracy reaches
    `stop_accuracy` (Zoology stops at 0.99), checked every `steps_per_call` steps. protocol "mixture" (default; the
    Based paper's Fig. 2 protocol, zoology `arxiv24_based_figure2/configs.py`): one model per (mechanism, d_model)
    trained on the union of the cells' training sets, `train_examples` of the shortest cell and a fifth as many of
    each longer one (Based: 100k / 20k / 20k), every step drawing 48 / 8 / 4 rows at batch_size 64 (bench/tasks.py
    `training_plan`), each cell scored on its own held-out set. protocol "per_cell" (Zoology's ICLR Fig. 2): one
    model per cell, `train_examples` each, batch_size * 64 / T rows per step (the same tokens per step at every
    length)."""

    protocol: str = "mixture"  # or "per_cell"
    train_examples: int = 20_000
    test_examples: int = 1_000
    batch_size: int = 64
    steps: int = 2000
    learning_rate: float = 6e-3  # the embedding's (and norms'); matrices: see matrix_lr_base_width
    width_learning_rates: tuple = ()  # ((d_model, lr), ...): overrides learning_rate for those widths
    # Matrices other than the embedding train at learning_rate * matrix_lr_base_width / d_model (muP's Adam rule);
    # 0 turns the scaling off (every parameter at learning_rate). See matrix_learning_rate_labels.
    matrix_lr_base_width: int = 32  # d_model 64: matrices at 3e-3, 128: 1.5e-3
    vocab_size: int = 512  # Zoology uses 8,192; must exceed the longest sequence
    steps_per_call: int = 100
    stop_accuracy: float = 0.99
    init: str = "zoology"  # "zoology": GPT-2 style normal(0.02) weights as Zoology's _init_weights; "model": ours
    # "auto": each mechanism's own (MECHANISMS, 1 where unset); "one" or "sqrt" for every mechanism
    final_norm_gain: str = "auto"
    warmup: float = 0.1  # share of the steps with a linear warmup before the cosine decay
    tie_embeddings: bool = True  # False: a separate output matrix, logits x W without the tied 1/sqrt(d) (a probe)
    positions: str = "rope"  # "learned": Zoology's learned absolute positions (normal(0.02)) and no rotary
    init_std: float = 0.02  # with init "zoology": the normal's standard deviation (Zoology's 0.02)


def model_config(mechanism: str, width: int, vocab_size: int, tie_embeddings: bool = True) -> LLMConfig:
    options = dict(MECHANISMS[mechanism])
    options.pop("final_norm_gain", None)  # an init setting (final_norm_gain_for), not a model option
    heads = options.pop("num_heads", 1)
    return LLMConfig(vocab_size=vocab_size, width=width, depth=2, num_heads=heads, num_kv_heads=options.pop(
        "num_kv_heads", heads), use_mlp=False, attention=mechanism, tie_embeddings=tie_embeddings, **options)


def final_norm_gain_for(mechanism: str, budget: Budget) -> str:
    """The final norm's initial gain for this mechanism: Budget.final_norm_gain unless "auto", then MECHANISMS'."""
    if budget.final_norm_gain == "auto":
        return MECHANISMS[mechanism].get("final_norm_gain", "one")
    return budget.final_norm_gain


def zoology_init(model: LLM, key: jax.Array, depth: int = 2, std: float = 0.02, final_norm_gain: str = "one") -> None:
    """Re-draws the model's weights as Zoology's `_init_weights` does (zoology/model.py): every matrix (embedding,
    projections, routers; not BaseConv's convolution, a torch Conv1d there) from normal(0, 0.02), the attention
    output projections from normal(0, 0.02 / sqrt(2 * n_layers)); norm scales and biases stay as they are.
    Why: the LLM's own init (unit-variance embeddings, fan-in projections) makes each AdamW step a much smaller
    *relative* change of the weights (lr / std: 6x smaller for d_model 64 projections, 50x for the embedding), which
    is what made MQAR learn ~10x slower here than in Zoology (bench/RESULTS.md)."""
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    fresh = []
    for (path, leaf), leaf_key in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        if leaf.ndim < 2 or "conv_kd" in name or "filter" in name:  # norms, biases; Conv1d keeps torch's init
            fresh.append(leaf)
            continue
        scale = std / (2 * depth) ** 0.5 if "out_nhd" in name else std
        fresh.append(scale * jax.random.normal(leaf_key, leaf.shape, leaf.dtype))
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, fresh))
    # The final norm keeps its unit gain unless asked, although our tied output divides by sqrt(d_model) and
    # Zoology's does not: a gain of sqrt(d_model) (final_norm_gain="sqrt", Zoology's initial logit scale) held
    # softmax on the 1/D plateau but is what the linear attentions and the sliding window need (MECHANISMS).
    if final_norm_gain == "sqrt":
        width = model.final_norm.scale_d.shape[0]
        model.final_norm.scale_d[...] = jnp.full((width,), width**0.5, model.final_norm.scale_d.dtype)


class LearnedPositions(nnx.Module):
    """The token embedding plus a learned absolute position table [T, D], as Zoology's TokenEmbeddings
    (zoology/model.py, max_position_embeddings > 0); `attend` is the token table's (tied output)."""

    def __init__(self, embed: nnx.Module, seq_len: int, width: int, key: jax.Array, std: float = 0.02):
        self.inner = embed
        self.position_td = nnx.Param(std * jax.random.normal(key, (seq_len, width), embed.embedding_vd.dtype))

    @property
    def embedding_vd(self):
        return self.inner.embedding_vd

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        return self.inner(token_ids) + self.position_td[: token_ids.shape[-1]]

    def attend(self, x: jax.Array) -> jax.Array:
        return self.inner.attend(x)


def use_learned_positions(model: LLM, seq_len: int, key: jax.Array) -> None:
    """Zoology's positional scheme: learned absolute positions added to the token embedding, rotary turned off in
    every attention layer that has it (Zoology's MHA mixer has no rotary)."""
    if not all(hasattr(block.attention, "use_rope") for block in model.blocks):
        raise ValueError("positions='learned' needs attention layers with a `use_rope` switch (softmax-like ones)")
    for block in model.blocks:
        block.attention.use_rope = False
    model.embed = LearnedPositions(model.embed, seq_len, model.embed.embedding_vd.shape[1], key)


def matrix_learning_rate_labels(params) -> object:
    """'matrix' for the hidden weight matrices (attention and mixer projections, routers, gates, convolution
    kernels: every parameter of two or more axes outside the embedding), 'other' for the token embedding (tied: also
    the output), learned positions, norm scales, biases and decay slopes. Why: under Adam every weight moves by about
    the learning rate per step, so a consistent update moves a d x d matrix's output by about lr * d: the same lr is
    twice as large a step in function space at d_model 128 as at 64, while an embedding row's step does not grow with
    d. muP (Yang et al. 2022, "Tensor Programs V", arXiv 2203.03466, Table 3: Adam, hidden weights lr ~ 1/fan_in,
    input weights and vectors lr ~ 1) scales only the matrices. MQAR at d_model 128 with one lr for all parameters
    stayed on the 1/D plateau (T = 64, D = 4) for 1,200-2,400 steps at lr 1e-3, 1.5e-3, 3e-3 and 1e-2, with layer 2
    attending to the matching *key* (a dead end) or to no value at all; with the embedding at 3e-3 and the matrices
    at half that, two seeds reached 99.9% and 99.7% by 1,000 steps (bench/RESULTS.md)."""
    def label(path, leaf):
        in_embedding = getattr(path[0], "key", None) == "embed"  # the token table and learned positions
        return "other" if in_embedding or getattr(leaf, "ndim", 0) < 2 else "matrix"

    return jax.tree_util.tree_map_with_path(label, params)


def optimizer_for(model: LLM, budget: Budget, width: int, steps: int) -> tuple[nnx.Optimizer, float, float]:
    """(AdamW with weight decay 0.1, 10% warmup then cosine, the embedding's lr, the matrices' lr)."""
    learning_rate = dict(budget.width_learning_rates).get(width, budget.learning_rate)
    matrix_rate = learning_rate * (budget.matrix_lr_base_width / width if budget.matrix_lr_base_width else 1.0)
    warmup = max(1, int(steps * budget.warmup))
    adamw = lambda rate: optax.adamw(optax.warmup_cosine_decay_schedule(0.0, rate, warmup, steps), weight_decay=0.1)
    transform = optax.multi_transform({"other": adamw(learning_rate), "matrix": adamw(matrix_rate)},
                                      matrix_learning_rate_labels)
    return nnx.Optimizer(model, transform, wrt=nnx.Param), learning_rate, matrix_rate


def query_rows(model, inputs, labels, num_pairs):
    """Logits [B, D, V] and labels [B, D] at the D query positions (the only scored ones)."""
    positions = jnp.argsort(labels == IGNORE, axis=1, stable=True)[:, :num_pairs]  # query positions first
    features = jnp.take_along_axis(model.features(inputs), positions[..., None], axis=1)
    return model.logits(features), jnp.take_along_axis(labels, positions, axis=1)
