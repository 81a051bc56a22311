"""What every converter in models/interop does the same way: arrays out of torch tensors or NNX variables, the
attnx parameter tree flattened to dotted names ("blocks.0.attention.query_dnh"), the key check whose error lists
every missing, unexpected and wrongly shaped key, and the converted arrays placed back in the model's own tree (so a
naming drift in models/ fails at conversion, not at the first forward)."""

from typing import Any, Callable, Mapping

import numpy as np
from flax import nnx


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (bfloat16 widened to float32: numpy has no bfloat16), an NNX variable or any array -> numpy."""
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    if isinstance(value, nnx.Variable):
        value = value.get_value()
    return np.asarray(value)


def dotted(key: tuple) -> str:
    """An nnx flat-state key ('blocks', 0, 'mlp', 'down_fd') -> 'blocks.0.mlp.down_fd'."""
    return ".".join(map(str, key))


def check_keys(where: str, got: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]],
               ignore: tuple[str, ...] = ()) -> None:
    """Raises ValueError naming `where` and listing missing keys, unexpected keys (except `ignore`) and keys whose
    shape differs from `expected` (both shapes)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(k for k in set(got) - set(expected) if k not in ignore)
    wrong = sorted(f"{k}: got {tuple(np.shape(to_numpy(got[k])))}, expected {tuple(expected[k])}"
                   for k in set(got) & set(expected) if tuple(np.shape(to_numpy(got[k]))) != tuple(expected[k]))
    if missing or unexpected or wrong:
        raise ValueError(f"{where} does not match the expected layout: missing keys {missing}; unexpected keys "
                         f"{unexpected}; wrong shapes {wrong}")


def param_shapes(build: Callable[[], nnx.Module]) -> dict[str, tuple[int, ...]]:
    """{dotted name: shape} of every nnx.Param of the model `build()` would make (built abstractly, no arrays)."""
    abstract = nnx.eval_shape(build)
    return {dotted(k): tuple(v.shape) for k, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def flat_params(params_or_model: Any) -> dict[str, np.ndarray]:
    """{dotted name: numpy array} of a model's parameters, given the model, its nnx.State of Params, or a flat
    dict already keyed by dotted names."""
    if isinstance(params_or_model, nnx.Module):
        params_or_model = nnx.state(params_or_model, nnx.Param)
    if isinstance(params_or_model, nnx.State):
        return {dotted(k): to_numpy(v) for k, v in nnx.to_flat_state(params_or_model)}
    return {k: to_numpy(v) for k, v in dict(params_or_model).items()}


def state_from_flat(build: Callable[[], nnx.Module], flat: Mapping[str, np.ndarray], dtype: Any,
                    where: str = "converted tree") -> nnx.State:
    """The nnx.State of `build()`'s parameters holding `flat` ({dotted name: array}) cast to `dtype`; the keys
    and shapes must be exactly the model's (check_keys)."""
    leaves = dict(nnx.to_flat_state(nnx.state(nnx.eval_shape(build), nnx.Param)))
    check_keys(where, flat, {dotted(k): tuple(v.shape) for k, v in leaves.items()})
    for key, variable in leaves.items():
        variable.set_value(np.asarray(flat[dotted(key)], dtype=dtype))
    return nnx.from_flat_state(leaves)
