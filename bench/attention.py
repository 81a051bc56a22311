"""Attention microbenchmark: time and memory of each implementation against `jax.nn.dot_product_attention`.

    python -m bench.attention                       # CPU defaults, a few minutes
    python -m bench.attention --T 4096 --causal 1 --dtype float32 --backward
    python -m bench.attention --long                # adds T = 32k, 64k for the O(T)-memory paths, fwd+bwd

Times are medians of `--repeats` calls after one compile-and-warm-up call. Memory is what XLA's compiler reports
for the compiled program (temporaries + arguments + outputs: deterministic, and the number that decides whether it
fits), plus the device's peak when the backend reports one (GPU). The same run measures the machine's float32 (or
bf16) matmul rate, so every speed is also a share of what this machine can do.

Output: a table on stdout, JSON (`--out`), a log-log PNG of time and memory against T (`--plot`), and the goal
lines of issue 2 (share of the matmul rate, ratio to jax.nn, ratio to tokamax's xla_chunked at T=4096 causal f32).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import attnx
from bench.provenance import git_commit


def _median_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_rate(dtype, repeats: int = 10, size: int = 2048) -> float:
    """FLOP/s of a square matmul in `dtype` on the default device: the *best* of `repeats` calls, i.e. what the
    machine can do. (The median swung between 76 and 136 GFLOP/s within minutes on a shared 2-core VM; the best is
    stable and makes every "share of the matmul rate" conservative.)"""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    jax.block_until_ready(f(a, a))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, a))
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best


def attention_flops(B, T, S, N, H, causal: bool, backward: bool) -> float:
    """FlashAttention convention: forward 4·B·T·S·N·H, halved when causal; forward+backward 3.5x forward."""
    f = 4.0 * B * T * S * N * H * (0.5 if causal else 1.0)
    return f * 3.5 if backward else f


def _implementations(names):
    out = {}
    for name in names:
        if name == "tokamax_xla_chunked":
            try:
                import tokamax
            except ImportError:
                print("# tokamax not installed: skipping tokamax_xla_chunked (pip install -e '.[bench]')")
                continue

            from absl import flags

            if not flags.FLAGS.is_parsed():  # tokamax reads absl flags; keep our own argv away from absl
                flags.FLAGS(sys.argv[:1])

            def tk(q, k, v, causal, _t=tokamax):
                return _t.dot_product_attention(q, k, v, is_causal=bool(causal), implementation="xla_chunked")
            out[name] = tk
        elif name == "jax_nn":
            out[name] = lambda q, k, v, causal: jax.nn.dot_product_attention(q, k, v, is_causal=bool(causal))
        else:
            out[name] = (lambda impl: lambda q, k, v, causal: attnx.dot_product_attention(
                q, k, v, mask=attnx.Mask(causal=True) if causal else None, implementation=impl))(
                None if name == "attnx_default" else name)
    return out


DENSE = ("jax_nn", "reference", "xla")
PEERS = DENSE + ("tokamax_xla_chunked",)


def run_one(name, fn, T, causal, dtype, args, rate, compile_only=False):
    B, N, H = args.batch, args.heads, args.head_dim
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, N, H)), dtype) for _ in range(3))
    row = dict(impl=name, T=T, causal=bool(causal), dtype=jnp.dtype(dtype).name, B=B, N=N, H=H,
               backward=bool(args.backward))
    if args.backward:
        f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, causal).astype(jnp.float32) ** 2),
                             argnums=(0, 1, 2)))
    else:
        f = jax.jit(lambda q, k, v: fn(q, k, v, causal))
    compiled = f.lower(q, k, v).compile()
    mem = compiled.memory_analysis()
    row["temp_bytes"] = int(mem.temp_size_in_bytes)
    row["total_bytes"] = int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)
    if row["total_bytes"] > args.memory_limit_gib * 2 ** 30:
        row["skipped"] = f"needs {row['total_bytes'] / 2 ** 30:.1f} GiB > --memory-limit-gib"
        return row
    if compile_only:
        row["skipped"] = f"T > --peer-max-T (compiled: {row['total_bytes'] / 2 ** 30:.2f} GiB)"
        return row
    repeats = args.repeats if T <= 4096 else max(1, args.repeats // 2)
    row["seconds"] = _median_time(compiled, q, k, v, repeats=repeats)
    flops = attention_flops(B, T, T, N, H, causal, args.backward)
    row["tflops"] = flops / row["seconds"] / 1e12
    row["share_of_matmul_rate"] = flops / row["seconds"] / rate
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        row["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    return row


def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = jax.devices()[0]
    return dict(backend=jax.default_backend(), device=getattr(dev, "device_kind", str(dev)), cpu=cpu,
                cores=os.cpu_count(), jax=jax.__version__, python=platform.python_version())


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    impls = sorted({r["impl"] for r in rows})
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(impls)}
    keys = sorted({(r["impl"], r["causal"], r["dtype"]) for r in rows})
    for impl, causal, dtype in keys:
        rs = sorted((r for r in rows if (r["impl"], r["causal"], r["dtype"]) == (impl, causal, dtype)),
                    key=lambda r: r["T"])
        timed = [r for r in rs if "seconds" in r]
        style = dict(color=colors[impl], linestyle="-" if causal else "--",
                     marker="o" if dtype == "float32" else "s", markersize=4)
        label = f"{impl} {'causal' if causal else 'full'} {dtype}"
        axes[0].plot([r["T"] for r in timed], [r["seconds"] for r in timed], label=label, **style)
        # Memory includes compile-only rows (a dense path beyond --peer-max-T): what it would need.
        axes[1].plot([r["T"] for r in rs], [r["total_bytes"] / 2 ** 20 for r in rs], label=label, **style)
    for ax, ylabel in zip(axes, ("seconds (median)", "compiled memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=6, loc="upper left")
    axes[0].set_title("solid: causal, dashed: full; o float32, s bfloat16", fontsize=8)
    fig.suptitle("attention: time and memory vs T (" + ("forward+backward" if rows and rows[0]["backward"]
                                                         else "forward") + ")")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--causal", type=int, nargs="+", default=[1, 0], choices=[0, 1])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--impl", nargs="+", default=["jax_nn", "chunked", "attnx_default", "tokamax_xla_chunked"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--backward", action="store_true", help="time forward+backward (grad w.r.t. q, k, v)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peer-max-T", type=int, default=4096,
                   help="largest T timed for the baselines (jax.nn, tokamax) and the O(T^2)-memory paths; beyond "
                        "it they are only compiled, for their memory (keeps the default run to a few minutes)")
    p.add_argument("--bf16-max-T", type=int, default=2048, help="largest T timed in bfloat16 (slow on CPU)")
    p.add_argument("--memory-limit-gib", type=float, default=20.0)
    p.add_argument("--long", action="store_true", help="add T=32768, 65536 (O(T)-memory paths, fwd+bwd)")
    p.add_argument("--out", default="bench/out/attention.json")
    p.add_argument("--plot", default="bench/out/attention.png")
    args = p.parse_args(argv)
    if args.long:
        args.T = sorted(set(args.T) | {32768, 65536})
        args.backward = True

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    impls = _implementations(args.impl)
    rates = {dt: matmul_rate(jnp.dtype(dt)) for dt in args.dtype}
    machine = _machine()
    print(f"# {machine}  commit {git_commit()}")
    for dt, r in rates.items():
        print(f"# matmul rate {dt}: {r / 1e9:.1f} GFLOP/s (2048^3, best of 10)")
    rows = []
    header = f"{'impl':<20} {'dtype':<9} {'causal':<6} {'T':>6} {'seconds':>9} {'GFLOP/s':>8} {'%mm':>5} " \
             f"{'vs jax.nn':>9} {'MiB':>9}"
    print(header)
    print("-" * len(header))
    for dt in args.dtype:
        for causal in args.causal:
            for T in args.T:
                if jnp.dtype(dt) != jnp.float32 and T > args.bf16_max_T:
                    continue
                base = None
                for name, fn in impls.items():
                    if T > 16384 and name not in ("chunked", "attnx_default", "jax_nn"):
                        continue
                    row = run_one(name, fn, T, causal, jnp.dtype(dt), args, rates[dt],
                                  compile_only=name in PEERS and T > args.peer_max_T)
                    rows.append(row)
                    if name == "jax_nn" and "seconds" in row:
                        base = row["seconds"]
                    if "seconds" not in row:
                        print(f"{name:<20} {dt:<9} {causal:<6} {T:>6} {'skipped: ' + row['skipped']}")
                        continue
                    ratio = f"{base / row['seconds']:.2f}x" if base else "-"
                    print(f"{name:<20} {dt:<9} {causal:<6} {T:>6} {row['seconds']:>9.4f} "
                          f"{row['tflops'] * 1e3:>8.1f} {100 * row['share_of_matmul_rate']:>4.0f}% {ratio:>9} "
                          f"{row['total_bytes'] / 2 ** 20:>9.1f}", flush=True)
                # Ratios against jax.nn are filled in after jax.nn ran for this (dtype, causal, T).
                for r in rows:
                    if (r["T"], r["causal"], r["dtype"]) == (T, bool(causal), jnp.dtype(dt).name) and base:
                        r.setdefault("speedup_vs_jax_nn", base / r["seconds"] if "seconds" in r else None)
    goals = _goals(rows)
    for line in goals:
        print(line)
    result = dict(machine=machine, commit=git_commit(), date=datetime.date.today().isoformat(),
                  matmul_rate=rates and {k: v for k, v in rates.items()}, args=vars(args), rows=rows, goals=goals)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    if args.plot:
        plot(rows, args.plot)
    print(f"# wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return result


def _goals(rows):
    """Issue-2 goal lines at T=4096, causal, float32."""
    def find(impl):
        for r in rows:
            if (r["impl"], r["T"], r["causal"], r["dtype"]) == (impl, 4096, True, "float32") and "seconds" in r:
                return r
        return None

    ours, nn, tk = find("attnx_default"), find("jax_nn"), find("tokamax_xla_chunked")
    if ours is None:
        return ["# goals: T=4096 causal float32 not in this run"]
    lines = [f"# goal: default implementation at T=4096 causal f32 reaches "
             f"{100 * ours['share_of_matmul_rate']:.0f}% of the f32 matmul rate (goal >= 50%)"]
    if nn:
        lines.append(f"# goal: {nn['seconds'] / ours['seconds']:.2f}x faster than jax.nn.dot_product_attention "
                     f"(goal >= 5x)")
    if tk:
        lines.append(f"# goal: {tk['seconds'] / ours['seconds']:.2f}x faster than tokamax xla_chunked (goal >= 3x)")
    return lines


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
