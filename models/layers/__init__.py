"""Building blocks shared by the model families: attention, MLP, norms, rotary embeddings, token embeddings."""

import jax.numpy as jnp

PARAM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # the `param_dtype` names every config accepts


def check_param_dtype(owner: str, param_dtype: str) -> None:
    if param_dtype not in PARAM_DTYPES:
        raise ValueError(f"{owner}.param_dtype={param_dtype!r}; allowed: {sorted(PARAM_DTYPES)}")
