"""LLMConfig.remat and LLMConfig.scan_layers: every combination computes the plain model's logits and gradients
(float32 tolerance table) from the same parameter tree; remat lowers the gradient's temporary memory; features that
ride on context variables or sown values (VAR's residual stream, run-time attention inputs, MoH's balance loss) keep
working under scan and remat; bad values are refused with the field's name.

One jitted forward + gradient per variant (module level), tiny shapes: width 32, depth 3, B=2, T=8."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.testing.tolerances import assert_close
from models.layers.mixers import call_with_auxiliary_loss
from models.llm import LLM, LLMConfig
from nnx_helpers import filled_from_numpy

CONFIG = LLMConfig(vocab_size=48, width=32, depth=3, num_heads=4, num_kv_heads=2, mlp_width=40)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 48, (2, 8)), jnp.int32)
VARIANTS = [(remat, scan) for scan in (False, True) for remat in ("none", "attention", "full")]


def built_like(config: LLMConfig, params: nnx.State) -> nnx.Module:
    """The model of `config` holding `params` (a plain model's state: the parameter trees are the same)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: LLM(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, params)


def forward_and_grads(graphdef, params, tokens, *, attention_inputs=None):
    """Logits, the auxiliary (sown) loss or 0, and the gradient of <logits, W> + aux by every parameter."""
    def loss(params):
        model = nnx.merge(graphdef, params)
        logits, aux = call_with_auxiliary_loss(model, tokens, attention_inputs=attention_inputs)
        aux = jnp.zeros(()) if aux is None else aux
        # a fixed cotangent W of mixed signs: the gradients depend on every logit
        weights = jnp.cos(0.37 * jnp.arange(logits.size, dtype=jnp.float32)).reshape(logits.shape)
        return jnp.sum(logits * weights) + aux, (logits, aux)

    (_, (logits, aux)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return logits, aux, grads


_JITTED = {}


def run(config: LLMConfig, params: nnx.State, tokens=TOKENS, attention_inputs=None):
    """One compiled function per config (cached): logits, aux loss and gradients of the model of `config`."""
    graphdef = nnx.split(built_like(config, params))[0]
    name = repr(config)  # configs hold dicts: not hashable
    if name not in _JITTED:
        _JITTED[name] = jax.jit(lambda p, t, inputs: forward_and_grads(graphdef, p, t, attention_inputs=inputs))
    return _JITTED[name](params, tokens, attention_inputs)


def assert_same(actual, expected, what):
    logits, aux, grads = actual
    want_logits, want_aux, want_grads = expected
    assert_close(logits, want_logits, jnp.float32, "forward", f"{what} logits")
    assert_close(aux, want_aux, jnp.float32, "forward", f"{what} auxiliary loss")
    assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
    for (path, grad), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
        assert_close(grad, want, jnp.float32, "gradient", f"{what} d/d{jax.tree_util.keystr(path)}")


@pytest.fixture(scope="module")
def plain():
    model = filled_from_numpy(lambda: LLM(CONFIG, rngs=nnx.Rngs(0)), seed=3, scale=0.3)
    params = nnx.state(model)
    return params, run(CONFIG, params)


@pytest.mark.parametrize("remat,scan", [v for v in VARIANTS if v != ("none", False)])
def test_remat_and_scan_compute_the_plain_model(plain, remat, scan):
    params, expected = plain
    config = dataclasses.replace(CONFIG, remat=remat, scan_layers=scan)
    assert_same(run(config, params), expected, f"remat={remat}, scan_layers={scan}")


def test_parameter_tree_is_the_plain_models():
    """Checkpoints load both ways: the state's paths, shapes and dtypes do not depend on the knobs."""
    def tree(config):
        state = nnx.state(nnx.eval_shape(lambda: LLM(config, rngs=nnx.Rngs(0))))
        return [(jax.tree_util.keystr(path), leaf.shape, leaf.dtype)
                for path, leaf in jax.tree_util.tree_leaves_with_path(state)]

    plain_tree = tree(CONFIG)
    for remat, scan in VARIANTS:
        assert tree(dataclasses.replace(CONFIG, remat=remat, scan_layers=scan)) == plain_tree, (remat, scan)


# ---- features that ride on sown values and context variables --------------------------------------------------------

SMALL = dict(vocab_size=16, width=16, depth=2, num_heads=2, num_kv_heads=1, mlp_width=24)
MOH = LLMConfig(**dict(SMALL, num_heads=4), attention="moh", attention_kwargs={"n_shared": 2, "top_k": 1})
VAR = LLMConfig(**SMALL, attention="var", attention_kwargs={"image_span": (1, 5), "sink_dims": (3,), "tau": 2.0})
PAINT = LLMConfig(**SMALL, attention="head_modulation",
                  attention_kwargs={"mode": "code", "alpha": 0.7, "beta": 0.3, "from_position": 0})
SMALL_TOKENS = jnp.array([[0, 2, 1, 3, 4, 5, 1, 6], [7, 1, 8, 2, 9, 10, 11, 1]])
PAINT_INPUTS = {"local_tokens": jnp.zeros((2, 8), bool).at[0, [1, 3]].set(True).at[1, [2, 4]].set(True),
                "summary_tokens": jnp.zeros((2, 8), bool).at[0, 2].set(True).at[1, 1].set(True)}


def small_params(config, seed):
    model = filled_from_numpy(lambda: LLM(config, rngs=nnx.Rngs(0)), seed=seed, scale=0.5)
    if config.attention == "var":  # token 1 carries a massive activation on the sink dimension
        model.embed.embedding_vd[...] = model.embed.embedding_vd[...].at[1, 3].set(12.0)
    return nnx.state(model)


# ~10 s of compilation per model on 2 cores: the default run keeps the MoH case (sown values through both the
# scan and a checkpoint); the others are slow.
@pytest.mark.parametrize("config,remat,scan,inputs", [
    (MOH, "attention", True, None),   # the router's balance loss, sown inside a checkpoint inside the scan
    pytest.param(MOH, "full", False, None, marks=pytest.mark.slow),  # ... inside a rematerialised block
    # the residual stream h read by VAR's sink detector inside a checkpoint inside the scan
    pytest.param(VAR, "attention", True, None, marks=pytest.mark.slow),
    # run-time attention inputs published around the scan
    pytest.param(PAINT, "full", True, PAINT_INPUTS, marks=pytest.mark.slow),
], ids=["moh-sown-loss", "moh-full-remat", "var-residual-stream", "paint-attention-inputs"])
def test_sown_losses_and_context_variables_survive_remat_and_scan(config, remat, scan, inputs):
    params = small_params(config, seed=5)
    expected = run(config, params, SMALL_TOKENS, inputs)
    if config is MOH:
        assert float(expected[1]) > 0  # a balance loss was sown
    assert_same(run(dataclasses.replace(config, remat=remat, scan_layers=scan), params, SMALL_TOKENS, inputs),
                expected, f"{config.attention}, remat={remat}, scan_layers={scan}")


# ---- memory ---------------------------------------------------------------------------------------------------------

def temp_bytes(config, params):
    """XLA's temporary buffer size of the compiled forward + gradient (the variant's jitted function of `run`)."""
    run(config, params)  # compiled once (and cached) there
    compiled = _JITTED[repr(config)].lower(params, TOKENS, None).compile()
    analysis = compiled.memory_analysis()
    assert analysis is not None, "memory_analysis() is unavailable on this backend"
    return analysis.temp_size_in_bytes


def test_remat_reduces_the_gradients_temporary_memory(plain):
    """Measured on CPU (jax 0.10.2), B=2, T=8: scanned, full remat needs about 0.6x the temporaries of no remat.
    Unrolled (scan_layers=False), XLA:CPU's scheduler runs the recomputation early and the temporaries barely change
    (~3-6% less at T=64..512), so this checks the scanned model, where each layer's recomputation sits in its own
    backward iteration; `attention` lies in between (slow test)."""
    params, _ = plain
    none = temp_bytes(dataclasses.replace(CONFIG, scan_layers=True), params)
    full = temp_bytes(dataclasses.replace(CONFIG, scan_layers=True, remat="full"), params)
    assert full < 0.8 * none, (full, none)


@pytest.mark.slow  # two more compilations (~10 s)
def test_attention_remat_memory_lies_between_none_and_full(plain):
    params, _ = plain
    sizes = [temp_bytes(dataclasses.replace(CONFIG, scan_layers=True, remat=remat), params)
             for remat in ("none", "attention", "full")]
    assert sizes[0] > sizes[1] > sizes[2], sizes


def test_remat_checkpoints_one_call_per_layer(plain):
    """The unrolled model's jaxpr holds one checkpoint per block (full) or per mixer (attention): remat is applied
    even where XLA:CPU's memory does not show it. Tracing only (no compilation)."""
    params, _ = plain

    def count_checkpoints(config):
        graphdef = nnx.split(built_like(config, params))[0]
        jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(TOKENS))(params)
        names = [eqn.primitive.name for eqn in jaxpr.eqns]
        return sum(name in ("checkpoint", "remat", "remat2") for name in names), names

    assert count_checkpoints(CONFIG)[0] == 0
    assert count_checkpoints(dataclasses.replace(CONFIG, remat="full"))[0] == CONFIG.depth
    assert count_checkpoints(dataclasses.replace(CONFIG, remat="attention"))[0] == CONFIG.depth


# ---- validation -----------------------------------------------------------------------------------------------------

def test_bad_values_are_refused_with_the_field_name():
    with pytest.raises(ValueError, match=r"LLMConfig.remat='some'; allowed: \('none', 'attention', 'full'\)"):
        dataclasses.replace(CONFIG, remat="some")
    with pytest.raises(ValueError, match="LLMConfig.scan_layers must be a bool, got 1"):
        dataclasses.replace(CONFIG, scan_layers=1)
    with pytest.raises(ValueError, match=r"LLMConfig.scan_layers=True .* layer_attention=\('softmax', 'base_conv'\)"):
        dataclasses.replace(CONFIG, scan_layers=True, layer_attention=("softmax", "base_conv"))
    # the same config entry in every layer, but TNL's mixer holds its layer index: refused when the blocks are built
    config = dataclasses.replace(CONFIG, scan_layers=True, layer_attention=("tnl",))
    with pytest.raises(ValueError, match="LLMConfig.scan_layers=True: .* block 1 is built differently"):
        nnx.eval_shape(lambda: LLM(config, rngs=nnx.Rngs(0)))
