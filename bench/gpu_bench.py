"""One-call GPU benchmark of attnx's attention kernels (issue 7, deliverable 8); `bench/gpu.sh` runs it.

    PYTHONPATH=. python -m bench.gpu_bench --out bench/out/gpu       # on a GPU, < 5 minutes (--budget 270)
    PYTHONPATH=. python -m bench.gpu_bench --quick --out /tmp/gpu    # tiny sizes: CPU smoke test (Pallas interpret)

Sections (bf16; each row is one compiled case, forward "fwd" and forward+backward "fwd+bwd", the latter being the
vjp of the output against a random cotangent, i.e. the gradient of sum(out * cotangent) w.r.t. q, k and v):
  softmax       attnx.dot_product_attention with implementation "pallas_gpu", "cudnn", "xla" (jax.nn), and tokamax
                when importable; head dims 128 and 64, S 1k..16k at a fixed B·S = 16k tokens and N·H = 2048 (so
                every point does the same work per token, the FlashAttention-3 paper's setting), causal on and off.
                TFLOP/s in the FlashAttention convention (`bench.gpu_harness`), also as a share of this machine's
                bf16 matmul rate (8192³, best of the samples). The forward of each implementation is checked once per
                (head dim, causal) against attnx's float32 reference on the last query rows (bf16 tolerance).
  block_sparse  the same call with Mask(block_mask=..., block_size=(128, 128)), a random block mask with 50/75/90%
                of its blocks off (diagonal blocks kept) shared by all heads, at S = 32k, against the unmasked
                dense call of the same implementation (SeerAttention's setting, arXiv 2410.13276 §4).
  linear        Lightning Attention-2 (Qin et al. 2024, arXiv 2401.04658, Alg. 1): attnx.ops.linear.pallas_gpu's
                `lightning_pallas` and the lax.scan `lightning_chunked`, against causal dense flash attention,
                S 2k..32k at a fixed B·S = 32k, in tokens/s.
  neighborhood  2-D neighbourhood attention, 64×64 tokens, kernel 7 (NATTEN, arXiv 2403.04690): every
                implementation the registry lists except the dense "reference" (and "tiled" on the first Pallas
                flash kernel), against flash attention over all pairs with no mask, with the dense NA mask (from
                which a block-skipping kernel derives live tiles), and with the mask plus its row-major block mask.
A kernel that is missing (ImportError, NotImplementedError) is printed as "not available: <reason>" and recorded;
one that fails to compile or run is recorded as "failed"; neither stops the run. Cases past the time budget
(`--budget`, shared by the sections in the proportions of `gpu_harness.SECTION_SHARES`) are skipped and counted.

Narrower runs: --sections, --modes fwd, --seq, --head-dims, --impls (an implementation may carry config fields,
e.g. pallas_gpu:block_kv=128,num_warps=8, to compare tiles in one run), --linear-seq, --na-impls, --budget.

Output: progress lines, markdown tables and goal lines (issue 7) on stdout; the same tables in `gpu_bench.md` and
everything (machine, jax version, date, arguments, one row per case) in `gpu_bench.json` under `--out`.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import attnx
from attnx.ops.softmax.config import IMPLEMENTATIONS
from attnx.testing.tolerances import tolerance
from bench.gpu_harness import Budget, NotAvailable, Runner, attention_flops, time_call
from bench.gpu_tables import goal_lines, section_tables

SCHEMA = "attnx.gpu_bench/1"
MODES = ("fwd", "fwd+bwd")

# Full-size settings (issue 7) and the tiny ones of --quick (a CPU smoke test of the harness, not a measurement).
FULL = dict(seq=(16384, 8192, 4096, 2048, 1024), head_dims=(128, 64), tokens=16384, width=2048, matmul=8192,
            sparse_S=32768, sparse_block=128, sparse_heads=16, sparse_H=128,
            linear_seq=(32768, 16384, 8192, 4096, 2048), linear_tokens=32768, linear_heads=16, linear_H=128,
            na_grid=(64, 64), na_kernel=7, na_batch=8, na_heads=8, na_H=64, na_block=128,
            repeats=10, min_sample_s=0.02, check_rows=256)
QUICK = dict(seq=(64, 32), head_dims=(32, 16), tokens=64, width=64, matmul=128,
             sparse_S=64, sparse_block=16, sparse_heads=2, sparse_H=16,
             linear_seq=(64, 32), linear_tokens=64, linear_heads=2, linear_H=16,
             na_grid=(8, 8), na_kernel=3, na_batch=1, na_heads=2, na_H=16, na_block=16,
             repeats=2, min_sample_s=0.0, check_rows=8)
SPARSITIES = (0.5, 0.75, 0.9)


# ---- inputs and call wrappers ----

def _normal(seed: int, shapes, dtype):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return tuple(jax.random.normal(k, s, dtype) for k, s in zip(keys, shapes))


def _with_mode(fn, mode: str):
    """fn(q, k, v, *extra) -> out  becomes  (q, k, v, *extra) -> out  or  (q, k, v, *extra, ct) -> (dq, dk, dv)."""
    if mode == "fwd":
        return fn

    def fwd_bwd(q, k, v, *rest):
        *extra, ct = rest
        _, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, *extra), q, k, v)
        return vjp(ct)  # = grad of sum(out * ct) w.r.t. (q, k, v)
    return fwd_bwd


def implementation(spec: str):
    """"name" or "name:field=value,...", e.g. "pallas_gpu:block_kv=128,num_warps=8" -> attnx.PallasGpu(...), so one
    run can compare tile configurations; the row keeps the whole string as its label."""
    name, _, options = spec.partition(":")
    if name not in attnx.implementation_names():
        raise NotAvailable(f"attnx implementation {name!r} is not written yet "
                           f"(have: {', '.join(attnx.implementation_names())})")
    if not options:
        return name
    words = {"true": True, "false": False, "none": None}
    kwargs = {}
    for item in options.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"implementation {spec!r}: expected field=value after ':', got {item!r}")
        value = value.strip()
        kwargs[key.strip()] = words[value.lower()] if value.lower() in words else int(value)
    return IMPLEMENTATIONS[name](**kwargs)


def _attnx(impl: str, mask_fn=None):
    """(q, k, v, *mask arrays) -> attnx.dot_product_attention(..., mask=mask_fn(*arrays), implementation=impl)."""
    resolved = implementation(impl)
    return lambda q, k, v, *m: attnx.dot_product_attention(
        q, k, v, mask=None if mask_fn is None else mask_fn(*m), implementation=resolved)


def _tokamax():
    try:
        import tokamax
    except ImportError as err:
        raise NotAvailable(f"tokamax is not installed ({err})") from None
    from absl import flags
    if not flags.FLAGS.is_parsed():  # tokamax reads absl flags; keep our argv away from absl
        flags.FLAGS(sys.argv[:1])
    return tokamax


def softmax_fn(impl: str, causal: bool):
    if impl == "tokamax":
        tk = _tokamax()
        return lambda q, k, v: tk.dot_product_attention(q, k, v, is_causal=causal)
    return _attnx(impl, (lambda: attnx.Mask(causal=True)) if causal else None)


@jax.jit
def _max_rel_err(out, ref):
    """Largest |out - ref| / (atol + rtol |ref|) with the bf16 forward tolerance: <= 1 passes the table."""
    tol = tolerance(jnp.bfloat16, "forward")
    out = out.astype(jnp.float32)
    return jnp.max(jnp.abs(out - ref) / (tol.atol + tol.rtol * jnp.abs(ref)))


def _reference_last_rows(q, k, v, causal: bool, rows: int):
    """attnx's float32 reference for the last `rows` queries (cheap at any S: rows x S logits per head)."""
    S = k.shape[1]
    mask = attnx.Mask(causal=True, q_offset=S - rows) if causal else None
    f32 = lambda x: x.astype(jnp.float32)
    return attnx.dot_product_attention(f32(q[:, -rows:]), f32(k), f32(v), mask=mask, implementation="reference")


_reference_last_rows_jit = jax.jit(_reference_last_rows, static_argnames=("causal", "rows"))


# ---- sections ----

def run_matmul(size: int, dtype, cfg) -> dict:
    a, b = _normal(0, [(size, size)] * 2, dtype)
    f = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
    samples = time_call(f, (a, b), repeats=max(cfg["repeats"], 5), min_sample_s=cfg["min_sample_s"])
    best = min(samples)
    row = dict(size=size, dtype=jnp.dtype(dtype).name, seconds=best, flops_per_s=2.0 * size ** 3 / best)
    print(f"[matmul] {size}^3 {row['dtype']}: {row['flops_per_s'] / 1e12:.4g} TFLOP/s (best of {len(samples)})",
          flush=True)
    return row


def run_softmax(runner: Runner, cfg, impls, dtype) -> None:
    checked = set()
    # Longest sequences first, both head dims at each length: the goals are read at S = 8k-16k, and cases that
    # do not fit the time budget are then the short ones.
    for S in cfg["seq"]:
        B = max(1, cfg["tokens"] // S)
        for H in cfg["head_dims"]:
            N = cfg["width"] // H
            q, k, v, ct = _normal(S + H, [(B, S, N, H)] * 4, dtype)
            for causal in (False, True):
                for mode in cfg["modes"]:
                    for impl in impls:
                        info = dict(section="softmax", impl=impl, mode=mode, causal=causal, B=B, T=S, S=S, N=N,
                                    H=H, dtype=jnp.dtype(dtype).name)
                        fn, err = None, None
                        try:
                            fn = _with_mode(softmax_fn(impl, causal), mode)
                        except NotAvailable as e:
                            err = e
                        args = (q, k, v) if mode == "fwd" else (q, k, v, ct)
                        row, compiled = runner.case(info, fn, args, flops=attention_flops(B, S, S, N, H, causal, mode),
                                                    error=err)
                        if compiled is not None and mode == "fwd" and (impl, H, causal) not in checked:
                            checked.add((impl, H, causal))
                            rows = min(cfg["check_rows"], S)
                            ref = _reference_last_rows_jit(q, k, v, causal=causal, rows=rows)
                            err_ratio = float(_max_rel_err(compiled(q, k, v)[:, -rows:], ref))
                            row["check"] = dict(rows=rows, max_err_over_tolerance=err_ratio, ok=err_ratio <= 1.0)
                            if err_ratio > 1.0:
                                print(f"[softmax] MISMATCH {impl} H={H} causal={causal}: error {err_ratio:.2f}x the "
                                      f"bf16 tolerance vs the float32 reference", flush=True)
            del q, k, v, ct


def random_block_mask(n: int, sparsity: float, seed: int = 0) -> np.ndarray:
    """[n, n] bool with about `sparsity` of the blocks False; diagonal blocks are always kept."""
    keep = np.random.default_rng(seed).random((n, n)) >= sparsity
    np.fill_diagonal(keep, True)
    return keep


def run_block_sparse(runner: Runner, cfg, impl: str, dtype) -> None:
    S, bs, N, H = cfg["sparse_S"], cfg["sparse_block"], cfg["sparse_heads"], cfg["sparse_H"]
    q, k, v, ct = _normal(1, [(1, S, N, H)] * 4, dtype)
    n = -(-S // bs)
    dense_flops = {m: attention_flops(1, S, S, N, H, False, m) for m in MODES}
    for mode in cfg["modes"]:
        base = dict(section="block_sparse", impl=impl, mode=mode, B=1, T=S, S=S, N=N, H=H, block=bs,
                    dtype=jnp.dtype(dtype).name)
        extra = () if mode == "fwd" else (ct,)
        try:
            dense = _with_mode(_attnx(impl), mode)
            err = None
        except NotAvailable as e:
            dense, err = None, e
        runner.case(dict(base, sparsity=0.0, density=1.0), dense, (q, k, v) + extra, flops=dense_flops[mode],
                    error=err)
        try:  # one function for every sparsity: the block mask is data, so it compiles once (same shapes)
            fn = _with_mode(_attnx(impl, lambda m: attnx.Mask(block_mask=m, block_size=(bs, bs))), mode)
            err = None
        except NotAvailable as e:
            fn, err = None, e
        for sparsity in SPARSITIES:
            bm = random_block_mask(n, sparsity)
            density = float(bm.mean())
            # Effective FLOPs: only the kept blocks' share of the dense count.
            runner.case(dict(base, sparsity=sparsity, density=round(density, 4)), fn,
                        (q, k, v, jnp.asarray(bm)) + extra, flops=dense_flops[mode] * density, error=err)
    del q, k, v, ct


def _lightning(name: str):
    if name == "chunked":
        from attnx.ops.linear.chunked import lightning_chunked
        return lightning_chunked
    if name == "pallas_gpu":
        try:
            from attnx.ops.linear.pallas_gpu import lightning_pallas
        except ImportError as err:
            raise NotAvailable(f"attnx.ops.linear.pallas_gpu.lightning_pallas: {err}") from None
        return lightning_pallas
    raise ValueError(f"--linear-impls: {name!r}; allowed: 'pallas_gpu', 'chunked'")


def run_linear(runner: Runner, cfg, linear_impls, flash_impls, dtype) -> None:
    from attnx.ops.linear.decay import alibi_slopes

    N, H = cfg["linear_heads"], cfg["linear_H"]
    slopes = jnp.asarray(alibi_slopes(N))
    for S in cfg["linear_seq"]:
        B = max(1, cfg["linear_tokens"] // S)  # B = 1 beyond the fixed token count (e.g. S = 64k)
        q, k, v, ct = _normal(2 + S, [(B, S, N, H)] * 4, dtype)
        for mode in cfg["modes"]:
            base = dict(section="linear", mode=mode, causal=True, B=B, T=S, S=S, N=N, H=H,
                        dtype=jnp.dtype(dtype).name)
            args = (q, k, v) if mode == "fwd" else (q, k, v, ct)
            for name in linear_impls:
                try:
                    kernel = _lightning(name)
                    fn = _with_mode(lambda q, k, v, _f=kernel: _f(q, k, v, slopes), mode)
                    err = None
                except NotAvailable as e:
                    fn, err = None, e
                runner.case(dict(base, impl=f"lightning_{name}"), fn, args, tokens=B * S, error=err)
            for name in flash_impls:  # dense flash baseline: the first one that exists
                try:
                    fn, err = _with_mode(softmax_fn(name, True), mode), None
                except NotAvailable as e:
                    fn, err = None, e
                row, _ = runner.case(dict(base, impl=f"dense_{name}"), fn, args, tokens=B * S,
                                     flops=attention_flops(B, S, S, N, H, True, mode), error=err)
                if row["status"] in ("ok", "skipped"):
                    break
        del q, k, v, ct


def run_neighborhood(runner: Runner, cfg, flash_impls, na_impls, baselines, dtype) -> None:
    from attnx.ops.local.neighborhood import na_block_mask, na_mask

    grid, ks, bs = cfg["na_grid"], cfg["na_kernel"], cfg["na_block"]
    B, N, H, T = cfg["na_batch"], cfg["na_heads"], cfg["na_H"], int(np.prod(cfg["na_grid"]))
    q, k, v, ct = _normal(3, [(B, T, N, H)] * 4, dtype)
    spec = attnx.get_attention("neighborhood")
    params = inspect.signature(spec.fn).parameters
    has_impl = "implementation" in params
    # (label, keyword arguments): every implementation but the dense reference, and the tiled path (tokens
    # permuted into 2-D tiles, run by a block-skipping softmax kernel) on the first flash kernel that exists.
    names = [i for i in spec.implementations if i != "reference"] if na_impls is None else list(na_impls)
    variants = [(i, dict(implementation=i)) for i in names]
    if "tiled" in names and "tiled_implementation" in params:  # "chunked" is the tiled path's own default
        variants += [(f"tiled_{f}", dict(implementation="tiled", tiled_implementation=f)) for f in flash_impls
                     if f in attnx.implementation_names() and f != "chunked"][:1]
    dense = jnp.asarray(na_mask(grid, (ks,) * len(grid), (1,) * len(grid), (1,) * len(grid), (False,) * len(grid)))
    blocks = jnp.asarray(na_block_mask(grid, ks, block_size=(bs, bs)))
    na_flops = {m: attention_flops(B, T, ks ** len(grid), N, H, False, m) for m in MODES}
    for mode in cfg["modes"]:
        base = dict(section="neighborhood", mode=mode, B=B, T=T, S=T, N=N, H=H, grid="x".join(map(str, grid)),
                    kernel=ks, dtype=jnp.dtype(dtype).name)
        extra = () if mode == "fwd" else (ct,)
        for label, kwargs in variants:
            err = None if has_impl else NotAvailable("neighborhood has no implementation argument")
            fn = _with_mode(lambda q, k, v, _kw=kwargs: spec.fn(q, k, v, grid=grid, kernel_size=ks, **_kw), mode)
            runner.case(dict(base, impl=f"na_{label}"), fn, (q, k, v) + extra, flops=na_flops[mode], error=err)
        # Baselines: flash attention over all T x T pairs (no mask: what a kernel that cannot skip costs at
        # least), the same with the dense NA mask (a block-skipping kernel derives live tiles from it), and with
        # the mask plus its row-major block mask.
        masks = (("dense", None, ()),
                 ("masked_dense", lambda d: attnx.Mask(dense=d), (dense,)),
                 ("masked_blocks", lambda d, b: attnx.Mask(dense=d, block_mask=b, block_size=(bs, bs)),
                  (dense, blocks)))
        for label, mask_fn, arrays in (m for m in masks if m[0] in baselines):
            for name in flash_impls:  # the first flash implementation that takes the mask (or runs unmasked)
                try:
                    fn, err = _with_mode(_attnx(name, mask_fn), mode), None
                except NotAvailable as e:
                    fn, err = None, e
                row, _ = runner.case(dict(base, impl=f"{label}_{name}"), fn, (q, k, v, *arrays) + extra,
                                     flops=na_flops[mode], error=err)
                if row["status"] in ("ok", "skipped"):
                    break
    del q, k, v, ct


# ---- machine, output, entry point ----

def machine_info() -> dict:
    dev = jax.devices()[0]
    info = dict(backend=jax.default_backend(), device=getattr(dev, "device_kind", str(dev)),
                device_count=jax.device_count(), jax=jax.__version__, python=platform.python_version(),
                hostname=platform.node())
    try:
        import jaxlib
        info["jaxlib"] = jaxlib.__version__
    except (ImportError, AttributeError):
        pass
    try:  # the driver, clocks and power cap explain run-to-run differences between "H100"s
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
             "--format=csv,noheader"], capture_output=True, text=True, check=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["commit"] = "unknown"
    return info


def _memory_limit(gib: float | None) -> float:
    if gib is not None:
        return gib * 2 ** 30
    stats = jax.devices()[0].memory_stats() or {}
    # 85% of what the device allows leaves room for the inputs of the next case and the allocator's slack.
    return 0.85 * stats["bytes_limit"] if "bytes_limit" in stats else 40 * 2 ** 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "bench/out/gpu"),
                   help="directory for gpu_bench.json and gpu_bench.md (default $OUT or bench/out/gpu)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke test of the harness")
    p.add_argument("--budget", type=float, default=270.0, help="seconds for all sections; later cases are skipped")
    p.add_argument("--sections", nargs="+", default=["softmax", "block_sparse", "linear", "neighborhood"],
                   choices=["softmax", "block_sparse", "linear", "neighborhood"])
    p.add_argument("--impls", nargs="+", default=["pallas_gpu", "cudnn", "xla", "tokamax"],
                   help="softmax implementations: attnx names, optionally with config fields "
                        "(pallas_gpu:block_q=128,block_kv=128,num_warps=8), or 'tokamax'")
    p.add_argument("--flash-impls", nargs="+", default=["pallas_gpu", "cudnn", "xla"],
                   help="dense flash baselines of the linear and neighbourhood sections, first available wins")
    p.add_argument("--sparse-impl", default="pallas_gpu", help="the block-sparse kernel (and its dense baseline)")
    p.add_argument("--linear-impls", nargs="+", default=["pallas_gpu", "chunked"])
    p.add_argument("--na-baselines", nargs="+", default=["dense", "masked_dense", "masked_blocks"],
                   choices=["dense", "masked_dense", "masked_blocks"], help="neighbourhood flash baselines")
    p.add_argument("--na-impls", nargs="+", help="neighbourhood implementations (default: the registry's, "
                                                 "less 'reference')")
    p.add_argument("--seq", type=int, nargs="+", help="softmax sequence lengths (default 16k..1k)")
    p.add_argument("--head-dims", type=int, nargs="+", help="softmax head dims (default 128 64)")
    p.add_argument("--linear-seq", type=int, nargs="+", help="linear-scan sequence lengths (default 32k..2k)")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                   help="passes to time: forward, forward+backward or both")
    p.add_argument("--repeats", type=int, help="timed samples per case (median reported)")
    p.add_argument("--matmul-size", type=int, help="n of the n x n x n bf16 matmul that sets the rate (default 8192)")
    p.add_argument("--memory-limit-gib", type=float, help="skip cases whose compiled program needs more")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    cfg["modes"] = tuple(m for m in MODES if m in args.modes)
    for key in ("seq", "head_dims", "linear_seq"):
        if getattr(args, key) is not None:
            cfg[key] = tuple(getattr(args, key))
    for key, name in (("repeats", "repeats"), ("matmul_size", "matmul")):
        if getattr(args, key) is not None:
            cfg[name] = getattr(args, key)
    for flag, key, tokens in (("--seq", "seq", cfg["tokens"]), ("--linear-seq", "linear_seq", cfg["linear_tokens"])):
        for S in cfg[key]:
            if S < 1 or (tokens % S and S % tokens):
                p.error(f"{flag}: {S} must divide the fixed token count B*S = {tokens} or be a multiple of it "
                        f"(then B = 1)")
    for H in cfg["head_dims"]:
        if cfg["width"] % H:
            p.error(f"--head-dims: {H} does not divide the fixed width N*H = {cfg['width']}")
    for spec in [*args.impls, *args.flash_impls, args.sparse_impl]:
        if spec == "tokamax":
            continue
        try:  # a malformed config string is an error now, not a crash in the middle of the run
            implementation(spec)
        except NotAvailable:
            pass
        except (ValueError, TypeError) as err:
            p.error(f"implementation {spec!r}: {err}")
    if cfg["repeats"] < 1 or cfg["matmul"] < 1:
        p.error(f"--repeats, --matmul-size: must be >= 1, got {cfg['repeats']}, {cfg['matmul']}")
    return args, cfg


def write(path_dir: str, result: dict, tables: str) -> None:
    os.makedirs(path_dir, exist_ok=True)
    with open(os.path.join(path_dir, "gpu_bench.json"), "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    with open(os.path.join(path_dir, "gpu_bench.md"), "w") as fh:
        fh.write(tables + "\n")


def main(argv=None) -> dict:
    args, cfg = parse_args(argv)
    if args.quick and jax.default_backend() == "cpu":
        os.environ.setdefault("ATTNX_PALLAS_INTERPRET", "1")  # Pallas kernels run (slowly) in interpret mode
    dtype = jnp.bfloat16
    machine = machine_info()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"# attnx gpu_bench  {machine['device']} ({machine['backend']})  jax {machine['jax']}  {date}  "
          f"commit {machine['commit']}", flush=True)
    matmul = run_matmul(cfg["matmul"], dtype, cfg)
    runner = Runner(Budget(args.budget), cfg["repeats"], cfg["min_sample_s"], _memory_limit(args.memory_limit_gib),
                    matmul["flops_per_s"])
    result = dict(schema=SCHEMA, date=date, machine=machine, args=vars(args), config=cfg, matmul=matmul,
                  convention="FlashAttention: fwd 4*B*N*T*S*H, halved when causal; fwd+bwd 3.5x fwd; "
                             "neighborhood counts only the k^2 keys per query", rows=runner.rows)
    sections = {
        "softmax": lambda: run_softmax(runner, cfg, args.impls, dtype),
        "block_sparse": lambda: run_block_sparse(runner, cfg, args.sparse_impl, dtype),
        "linear": lambda: run_linear(runner, cfg, args.linear_impls, args.flash_impls, dtype),
        "neighborhood": lambda: run_neighborhood(runner, cfg, args.flash_impls, args.na_impls, args.na_baselines, dtype),
    }
    tables = ""
    try:
        for name in args.sections:
            runner.budget.open(name)
            try:
                sections[name]()
            except Exception as err:  # e.g. a registry import broken by a half-written kernel: next section
                result.setdefault("section_errors", {})[name] = f"{type(err).__name__}: {err}"[:500]
                print(f"[{name}] SECTION FAILED: {type(err).__name__}: {err}", flush=True)
            tables = section_tables(runner.rows, matmul)
            result.update(elapsed_s=round(runner.budget.elapsed(), 1), skipped_for_budget=runner.budget.skipped)
            write(args.out, result, tables)  # after every section, so a run cut short still leaves its numbers
    except KeyboardInterrupt:  # `timeout -s INT` in bench/gpu.sh: keep what was measured
        result["interrupted"] = True
        tables = section_tables(runner.rows, matmul)
        print("# interrupted: writing the cases measured so far", flush=True)
    goals = goal_lines(runner.rows)
    if args.quick:
        goals.insert(0, "# --quick: tiny sizes for a smoke test; the goal lines below are not measurements")
    result["goals"] = goals
    tables += "\n\n" + "\n".join(goals)
    print("\n" + tables, flush=True)
    write(args.out, result, tables)
    print(f"# {runner.budget.skipped} case(s) skipped for the time budget; elapsed {runner.budget.elapsed():.0f} s; "
          f"wrote {os.path.join(args.out, 'gpu_bench.json')} and gpu_bench.md", flush=True)
    return result


if __name__ == "__main__":
    main()
