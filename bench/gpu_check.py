"""GPU correctness check of the implementations that only run on a GPU (today: `cudnn`), against the reference.

Run by `bench/gpu.sh` on a lent GPU machine, which has jax but not pytest: this is a plain script that prints one
line per case and exits non-zero on any mismatch. Cases are a bf16 subset of the conformance suite's shapes that
cuDNN supports (head dim 64, causal/window/GQA/bias), checked with the tolerance table of `attnx.testing`.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import attnx
from attnx.testing.inputs import Case, make_inputs
from attnx.testing.tolerances import tolerance

CASES = [
    Case("causal_gqa", batch=(2,), T=256, S=256, N=8, K=2, H=64, V=64, dtype="bfloat16",
         mask=lambda c: attnx.Mask(causal=True)),
    Case("full", batch=(2,), T=128, S=384, N=4, K=4, H=64, V=64, dtype="bfloat16"),
    Case("window", batch=(1,), T=512, S=512, N=4, K=1, H=128, V=128, dtype="bfloat16",
         mask=lambda c: attnx.Mask(causal=True, window=(63, 0))),
    Case("bias", batch=(2,), T=128, S=128, N=4, K=2, H=64, V=64, dtype="bfloat16", bias=(1, "N", "T", "S")),
]


def run(case: Case, implementation) -> tuple:
    inputs = make_inputs(case)
    mask = case.mask(case) if case.mask else None
    names = [n for n in ("query", "key", "value", "bias") if n in inputs]

    def loss(*diff):
        kw = dict(inputs, **dict(zip(names, diff)))
        out = attnx.dot_product_attention(kw["query"], kw["key"], kw["value"], kw.get("bias"), mask,
                                          implementation=implementation)
        return jnp.sum(out.astype(jnp.float32) ** 2), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(names))), has_aux=True))(
        *(inputs[n] for n in names))
    return out, dict(zip(names, grads))


def main() -> int:
    print(f"# backend {jax.default_backend()}, devices {jax.devices()}")
    failures = 0
    for case in CASES:
        for impl in ("cudnn", "chunked", None):
            try:
                out, grads = run(case, impl)
            except NotImplementedError as err:
                print(f"{case.name:12s} {str(impl):8s} not implemented: {err}")
                continue
            ref_out, ref_grads = run(Case(**{**case.__dict__, "dtype": "float32"}), "reference")
            fwd, grad = tolerance(case.dtype, "forward"), tolerance(case.dtype, "gradient")
            err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out)))
            ok = bool(np.allclose(np.asarray(out, np.float32), np.asarray(ref_out), atol=fwd.atol, rtol=fwd.rtol))
            gerr = {}
            for n, g in grads.items():
                r = ref_grads[n]
                gerr[n] = float(jnp.max(jnp.abs(g.astype(jnp.float32) - r)))
                ok &= bool(np.allclose(np.asarray(g, np.float32), np.asarray(r), atol=grad.atol, rtol=grad.rtol))
            failures += not ok
            print(f"{case.name:12s} {str(impl):8s} {'ok  ' if ok else 'FAIL'} fwd max err {err:.3g}  grads "
                  + " ".join(f"{n}={e:.3g}" for n, e in gerr.items()), flush=True)
    print(f"# {failures} failing case(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
