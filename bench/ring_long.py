"""A long sequence trained with ring attention across the devices of one machine (issue 8: "a 32k-token sequence
trains with ring attention across 8 CPU devices").

    python -m bench.ring_long [--length 32768] [--devices 8] [--steps 3] [--width 64] [--depth 2]

The byte-level LLM (`attention="ring"`, attnx/ops/softmax/ring.py) takes one sequence of `--length` random bytes
split over a mesh of `--devices` devices on its `sequence` axis (forced host devices on a CPU; a GPU/TPU machine
uses its own), and AdamW trains it for `--steps` steps on next-byte cross-entropy. Each device holds length /
devices tokens; keys and values go around the ring, so no device ever materialises more than two chunks. Prints
per step the loss, the wall time and the process's peak resident memory, and checks that the first step's loss
equals the same model's loss computed on one device without the ring when `--check` is given (affordable up to a
few thousand tokens). Random bytes carry nothing to learn beyond the byte frequencies; the point is that the step
runs and its gradients flow, at a length whose [T, T] logits (4 GiB in float32 at 32k) no single step materialises.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.ring_long", description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--check", action="store_true", help="compare the first loss with a one-device run")
    args = parser.parse_args(argv)
    for name in ("length", "devices", "steps", "width", "depth"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.length % args.devices:
        parser.error(f"--length {args.length} must be divisible by --devices {args.devices}")
    if "jax" not in sys.modules:  # forced host devices must be set before JAX starts
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from models.llm import LLM, llm_config
    from train.sharding import MESH_AXES

    devices = jax.devices()
    if len(devices) < args.devices:
        raise SystemExit(f"ring_long: {args.devices} devices asked for, {len(devices)} found ({devices[0].platform})")
    mesh = Mesh(np.asarray(devices[: args.devices]).reshape(1, 1, 1, args.devices), MESH_AXES)
    config = llm_config("tiny", attention="ring", width=args.width, depth=args.depth, num_heads=4, num_kv_heads=2)
    model = LLM(config, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    tokens = np.random.default_rng(0).integers(0, 256, (1, args.length + 1)).astype(np.int32)

    def loss_fn(model, tokens):
        logits = model(tokens[:, :-1])
        targets = tokens[:, 1:]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0])

    @jax.jit
    def step(state, tokens):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    record = dict(length=args.length, devices=args.devices, platform=devices[0].platform, width=args.width,
                  depth=args.depth, steps=[])
    print(f"ring_long: {args.length} tokens over {args.devices} {devices[0].platform} devices "
          f"({args.length // args.devices} per device), width {args.width}, depth {args.depth}")
    with jax.set_mesh(mesh):
        batch = jax.device_put(tokens, NamedSharding(mesh, P()))
        # The state placed on the mesh (replicated) before the first step, so that the step compiles once: a state
        # still on one device would give step 2 a new input sharding and a second compile.
        state = jax.device_put(state, NamedSharding(mesh, P()))
        for index in range(args.steps):
            began = time.perf_counter()
            state, loss = step(state, batch)
            loss = float(loss)
            seconds = time.perf_counter() - began
            peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            record["steps"].append(dict(loss=loss, seconds=seconds, peak_rss_gib=peak_gib))
            print(f"  step {index + 1}: loss {loss:.4f}  {seconds:.1f} s{' (with compile)' if index == 0 else ''}  "
                  f"peak RSS {peak_gib:.2f} GiB", flush=True)
    if not all(np.isfinite(s["loss"]) for s in record["steps"]):
        raise SystemExit("ring_long: a loss is not finite")
    if args.check:
        plain = LLM(llm_config("tiny", attention="softmax", width=args.width, depth=args.depth, num_heads=4,
                               num_kv_heads=2), rngs=nnx.Rngs(0))
        reference = float(jax.jit(loss_fn)(plain, jnp.asarray(tokens)))
        record["one_device_loss"] = reference
        print(f"  one-device softmax loss of the initial model: {reference:.6f} (ring step 1: "
              f"{record['steps'][0]['loss']:.6f})")
        if abs(reference - record["steps"][0]["loss"]) > 1e-4 * max(1.0, abs(reference)):
            raise SystemExit("ring_long: the ring loss differs from the one-device loss")
    return record


if __name__ == "__main__":
    main()
