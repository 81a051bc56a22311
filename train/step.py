"""The pure training step: loss, gradients, optimizer update, and the non-finite guard, in one jitted function.

The train state is a plain dict pytree, so it jits, donates, shards and checkpoints without wrappers:
    params     nnx.State of the model's nnx.Param variables
    opt_state  the optax state for those params
    step       int32 scalar: number of optimizer steps taken (skipped non-finite steps included)
    rng        uint32 key data; step s uses fold_in(rng, s), so resuming needs no extra RNG bookkeeping
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

LossFn = Callable[[nnx.Module, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def init_train_state(params: nnx.State, tx: optax.GradientTransformation, seed: int) -> dict[str, Any]:
    return {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }


def make_train_step(merge: Callable[[nnx.State], nnx.Module], loss_fn: LossFn, tx: optax.GradientTransformation,
                    *, skip_nonfinite: bool):
    """Returns jit(state, batch) -> (state, metrics); the input state's buffers are donated (updated in place).

    `merge(params)` rebuilds the model from its parameters, e.g. `lambda p: nnx.merge(graphdef, p)`.

    `loss_fn(model, batch, rng)` gets a fresh key per step, `fold_in(state rng, step)`, for losses that draw noise
    (diffusion timesteps, label dropout): a resumed run draws the same keys as an uninterrupted one.

    metrics holds `loss`, `grad_norm`, `finite` (loss and gradient norm both finite) and whatever `loss_fn` adds.
    With `skip_nonfinite`, a non-finite step leaves params and optimizer state unchanged (the step counter still
    advances, so the data and schedule move on); otherwise the caller stops the run on `finite == False`.
    """

    def train_step(state, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

        def loss_of_params(params):
            return loss_fn(merge(params), batch, rng)

        (loss, aux), grads = jax.value_and_grad(loss_of_params, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            keep_old = lambda new, old: jnp.where(finite, new, old)
            params, opt_state = jax.tree.map(keep_old, (params, opt_state), (state["params"], state["opt_state"]))
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite, **aux}

    return jax.jit(train_step, donate_argnums=0)
