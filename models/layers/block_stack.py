"""Rematerialisation and scan-over-layers for NNX modules, without changing their parameter trees.

Both tools run a module as a pure function of its state: `nnx.split` gives (graph definition, state), the function
`nnx.merge`s them back inside the transformed computation, so JAX transformations (`jax.checkpoint`, `lax.scan`)
see only arrays. The module objects, and therefore the parameter tree that checkpoints store, stay as they are.

- `checkpointed_call(module, fn, *args)`: fn(module, *args) under `jax.checkpoint` (Chen et al., 2016, "Training
  Deep Nets with Sublinear Memory Cost", arXiv 1604.06174): the backward pass keeps only the call's inputs and
  recomputes everything inside it.
- `scan_blocks(blocks, fn, x)`: x = fn(block, x) for each block in order, as one `lax.scan` over the blocks' stacked
  states, so the compiled program holds one block body whatever the depth (compile time flat in depth). Gradients
  reach every block's own parameters through the stack (the transpose of `jnp.stack` slices them back). The blocks
  must have identical graph definitions (same classes and static attributes); their states may differ.

Sown intermediates (`Module.sow` under `nnx.capture`, e.g. MoH's and BAM's auxiliary losses) would be lost inside a
transformation, whose modules are fresh copies. When the caller captures (`__captures__` on the module), the copy is
captured too and its sown values are sown again on the caller's module after the transformation, one value per
name, replacing what was there (the keep-the-last `reduce_fn` the models' sowing layers use).
"""

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def checkpointed_call(module: nnx.Module, fn: Callable[..., Any], *args: Any,
                      policy: Callable[..., bool] | None = None, prevent_cse: bool = True) -> Any:
    """fn(module, *args) rematerialised: only `args` and the module's state are saved for the backward pass
    (`policy`, a `jax.checkpoint_policies` entry, may save more). args are pytrees of arrays (None allowed)."""
    graphdef, state = nnx.split(module)
    capture = hasattr(module, "__captures__")
    paths: dict[str, tuple] = {}

    def pure(state, *args):
        return _apply(graphdef, state, fn, args, capture, paths)

    out, sown = jax.checkpoint(pure, policy=policy, prevent_cse=prevent_cse)(state, *args)
    _sow_again(module, sown, paths)
    return out


def check_identical_blocks(blocks: Sequence[nnx.Module], owner: str) -> None:
    """Raises ValueError (naming `owner`) unless every block has block 0's graph definition."""
    graphdefs = [nnx.split(block)[0] for block in blocks]
    for index, graphdef in enumerate(graphdefs[1:], start=1):
        if graphdef != graphdefs[0]:
            raise ValueError(
                f"{owner}: scanning over layers runs one block body for every layer, but block {index} is built "
                f"differently from block 0 (a different mixer, different static options, or a mixer that holds its "
                f"layer index such as 'tnl'); use the same mixer and options in every layer, or scan_layers=False")


def scan_blocks(blocks: Sequence[nnx.Module], fn: Callable[[nnx.Module, jax.Array], jax.Array], x: jax.Array, *,
                remat: bool = False, owner: str = "scan_blocks") -> jax.Array:
    """fn(blocks[-1], ... fn(blocks[0], x)) as one lax.scan; with remat, each step is rematerialised (only the
    carried x and the step's block state are saved). fn may close over arrays (positions, token ids)."""
    check_identical_blocks(blocks, owner)
    graphdef = nnx.split(blocks[0])[0]
    states = [nnx.split(block)[1] for block in blocks]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    capture = hasattr(blocks[0], "__captures__")
    paths: dict[str, tuple] = {}

    def step(state, h):
        return _apply(graphdef, state, fn, (h,), capture, paths)

    if remat:  # inside scan the loop boundary already keeps XLA from merging the recomputation into the forward
        step = jax.checkpoint(step, prevent_cse=False)

    def body(h, state):
        return step(state, h)

    x, sown = jax.lax.scan(body, x, stacked)
    for index, block in enumerate(blocks):
        _sow_again(block, jax.tree.map(lambda value: value[index], sown), paths)
    return x


def _apply(graphdef, state, fn, args, capture: bool, paths: dict[str, tuple]):
    """(fn(module, *args), sown values by joined path) for the module rebuilt from (graphdef, state); records each
    sown value's path in `paths` (static, filled while tracing)."""
    module = nnx.merge(graphdef, state)
    if not capture:
        return fn(module, *args), {}
    out, intermediates = nnx.capture(fn, nnx.Intermediate)(module, *args)
    sown = {}
    for path, variable in nnx.to_flat_state(intermediates):
        name = "/".join(map(str, path))
        paths[name] = tuple(path)
        sown[name] = variable.get_value()
    return out, sown


def _sow_again(module: nnx.Module, sown: dict[str, Any], paths: dict[str, tuple]) -> None:
    """Sows each value of `sown` on the submodule of `module` at its path (keep-the-last)."""
    for name, value in sown.items():
        *parents, leaf = paths[name]
        target = module
        for entry in parents:
            target = target[entry] if isinstance(entry, int) else getattr(target, entry)
        target.sow(nnx.Intermediate, leaf, value, reduce_fn=lambda _, new: new, init_fn=lambda: None)
