"""The pure training step: loss, gradients, optimizer update, and the non-finite guard, in one jitted function.

The train state is a plain dict pytree, so it jits, donates, shards and checkpoints without wrappers:
    params     nnx.State of the model's nnx.Param variables
    opt_state  the optax state for those params
    step       int32 scalar: number of optimizer steps taken (skipped non-finite steps included)
    rng        uint32 key data; step s uses fold_in(rng, s), so resuming needs no extra RNG bookkeeping

Two memory/speed knobs (issue 8, deliverable 4):
- gradient accumulation: the batch is cut into microbatches whose gradients are summed in one `lax.scan` (the
  activations of one microbatch live at a time) before a single optimizer update;
- compute_dtype='bfloat16': mixed precision with float32 master weights (Micikevicius et al., 2018, "Mixed Precision
  Training", arXiv 1710.03740, §3.1): the float32 parameters are cast to bfloat16 inside the differentiated function,
  so the forward and backward passes run in bfloat16 while the gradients (the transpose of the cast), the optimizer
  state and the update stay float32. bfloat16 keeps float32's exponent range, so no loss scaling is needed (§3.3
  exists for float16, which is refused here). What stays float32 inside the model is the model's business: RMSNorm
  and LayerNorm statistics, the attention softmax (attnx accumulates logits and the online softmax in float32) and
  the LLM's logits (cast before the loss) are float32 already.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

LossFn = Callable[[nnx.Module, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]

COMPUTE_DTYPES = {None: None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}  # make_train_step(compute_dtype=)


def init_train_state(params: nnx.State, tx: optax.GradientTransformation, seed: int) -> dict[str, Any]:
    return {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }


def make_train_step(merge: Callable[[nnx.State], nnx.Module], loss_fn: LossFn, tx: optax.GradientTransformation,
                    *, skip_nonfinite: bool, gradient_accumulation: int = 1, compute_dtype: str | None = None,
                    out_shardings: Any = None):
    """Returns jit(state, batch) -> (state, metrics); the input state's buffers are donated (updated in place).

    `merge(params)` rebuilds the model from its parameters, e.g. `lambda p: nnx.merge(graphdef, p)`.

    `loss_fn(model, batch, rng)` gets a fresh key per step, `fold_in(state rng, step)`, for losses that draw noise
    (diffusion timesteps, label dropout): a resumed run draws the same keys as an uninterrupted one.

    metrics holds `loss`, `grad_norm`, `finite` (loss and gradient norm both finite) and whatever `loss_fn` adds.
    With `skip_nonfinite`, a non-finite step leaves params and optimizer state unchanged (the step counter still
    advances, so the data and schedule move on); otherwise the caller stops the run on `finite == False`.

    gradient_accumulation (int >= 1): every array of the batch is cut along its leading (batch) axis into this many
    microbatches, microbatch i holding examples i, i + n, i + 2n, ... (strided, so that each microbatch stays spread
    over the data-parallel devices without moving data); the step computes their gradients one after another in a
    `lax.scan`, averages gradients, loss and metrics over them, then makes one optimizer update. The result equals
    one step on the whole batch when `loss_fn` is a mean over equally weighted examples (metrics are means of the
    microbatches' values). Microbatch i's key is `fold_in(step key, i)`, so their noise is independent; with 1
    (default) the step is exactly the plain one, keys included. The leading axis of every batch array must be
    divisible by it (checked when the step is traced).

    compute_dtype: None (default) computes in the parameters' own dtype; 'bfloat16' casts the floating-point
    parameters to bfloat16 inside the differentiated function (float32 master weights, gradients and optimizer
    state; the loss is returned as float32); 'float32' casts them to float32 (e.g. for bfloat16-stored parameters).

    out_shardings: (state shardings, metrics sharding) for `jax.jit`; the trainer passes the shardings the state
    came in with, so the state never changes layout between steps and the step compiles once. None: XLA chooses.
    """
    check_step_options(gradient_accumulation, compute_dtype)
    cast = _caster(COMPUTE_DTYPES[compute_dtype])

    def loss_and_grads(params, batch, rng):
        def loss_of_params(params):
            loss, aux = loss_fn(merge(cast(params)), batch, rng)
            return loss.astype(jnp.float32), aux

        return jax.value_and_grad(loss_of_params, has_aux=True)(params)

    def train_step(state, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        if gradient_accumulation == 1:
            (loss, aux), grads = loss_and_grads(state["params"], batch, rng)
        else:
            (loss, aux), grads = _accumulate(loss_and_grads, state["params"], batch, rng, gradient_accumulation)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            keep_old = lambda new, old: jnp.where(finite, new, old)
            params, opt_state = jax.tree.map(keep_old, (params, opt_state), (state["params"], state["opt_state"]))
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite, **aux}

    if out_shardings is None:
        return jax.jit(train_step, donate_argnums=0)
    return jax.jit(train_step, donate_argnums=0, out_shardings=out_shardings)


def _accumulate(loss_and_grads, params, batch, rng, count: int):
    """((mean loss, mean metrics), mean gradients) over `count` strided microbatches, summed in float32 in a scan."""
    microbatches = split_microbatches(batch, count)
    first = jax.tree.map(lambda leaf: leaf[0], microbatches)
    shapes = jax.eval_shape(loss_and_grads, params, first, rng)
    zeros = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, jnp.float32), shapes)

    def add_microbatch(total, inputs):
        index, microbatch = inputs
        result = loss_and_grads(params, microbatch, jax.random.fold_in(rng, index))
        return jax.tree.map(lambda t, r: t + r.astype(jnp.float32), total, result), None

    total, _ = jax.lax.scan(add_microbatch, zeros, (jnp.arange(count), microbatches))
    # back to each value's own dtype (gradients of bfloat16-stored parameters stay bfloat16 for the optimizer)
    return jax.tree.map(lambda t, shape: (t / count).astype(shape.dtype)
                        if jnp.issubdtype(shape.dtype, jnp.floating) else t / count, total, shapes)


def split_microbatches(batch: dict[str, jax.Array], count: int) -> dict[str, jax.Array]:
    """Every array [B, ...] -> [count, B // count, ...], microbatch i holding examples i, i + count, ... (a strided
    split keeps each microbatch spread over the devices that hold contiguous slices of the batch axis)."""
    def split(path, leaf):
        if leaf.ndim == 0 or leaf.shape[0] % count:
            raise ValueError(
                f"make_train_step: gradient_accumulation={count} must divide the leading (batch) axis of every "
                f"batch array; batch{jax.tree_util.keystr(path)} has shape {tuple(leaf.shape)}")
        return jnp.swapaxes(leaf.reshape(leaf.shape[0] // count, count, *leaf.shape[1:]), 0, 1)

    return jax.tree_util.tree_map_with_path(split, batch)


def _caster(dtype) -> Callable[[Any], Any]:
    """params -> params with floating-point leaves in `dtype` (identity for None); integer leaves untouched."""
    if dtype is None:
        return lambda params: params
    return lambda params: jax.tree.map(
        lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def check_step_options(gradient_accumulation, compute_dtype) -> None:
    if isinstance(gradient_accumulation, bool) or not isinstance(gradient_accumulation, int) \
            or gradient_accumulation < 1:
        raise ValueError(f"make_train_step: gradient_accumulation must be an int >= 1 (the number of microbatches "
                         f"per optimizer step; 1 = off), got {gradient_accumulation!r}")
    if not isinstance(compute_dtype, (str, type(None))) or compute_dtype not in COMPUTE_DTYPES:
        reason = " (float16 would need loss scaling; bfloat16 has float32's range)" \
            if compute_dtype == "float16" else ""
        raise ValueError(f"make_train_step: compute_dtype={compute_dtype!r}; allowed: None (the parameters' own "
                         f"dtype), 'float32', 'bfloat16'{reason}")
