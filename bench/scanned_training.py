"""The small-model training loop the task benchmarks share (`bench/tasks.py` MQAR, `bench/listops.py`): many
optimizer steps per compiled call, because at these model sizes one step costs less than the Python dispatch of a
single jitted step."""

import jax
import numpy as np
from flax import nnx


def scanned_train_steps(graphdef, loss_fn):
    """jit fn(state, x, y, batches) -> (state, losses): one optimizer step per row of `batches` (example indices into
    x and y), the rows run as one `lax.scan`. state is `nnx.state((model, optimizer))` of `graphdef`;
    loss_fn(model, x_batch, y_batch) -> scalar. x, y and batches may also be matching tuples (one per dataset, e.g.
    sequence lengths of a training mixture): each step then indexes every dataset with its own row."""

    @jax.jit
    def train_steps(state, x, y, batches):
        def step(state, batch):
            model, optimizer = nnx.merge(graphdef, state)
            pick = lambda data: jax.tree.map(lambda array, rows: array[rows], data, batch)
            loss, grads = nnx.value_and_grad(loss_fn)(model, pick(x), pick(y))
            optimizer.update(model, grads)
            return nnx.state((model, optimizer)), loss

        return jax.lax.scan(step, state, batches)

    return train_steps


def shuffled_batches(num_examples: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """[steps, batch_size] example indices: passes over the data, each in a fresh random order."""
    order = np.random.default_rng(seed)
    passes = -(-steps * batch_size // num_examples)
    batches = np.concatenate([order.permutation(num_examples) for _ in range(passes)])
    return batches[: steps * batch_size].reshape(steps, batch_size)
