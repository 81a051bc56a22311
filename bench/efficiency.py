"""CAB efficiency length of every registered attention mechanism (issue 10).

Zhang et al., 2023, "CAB: Comprehensive Attention Benchmarking on Long Sequence Modeling", §4.3 (efficiency
length): time and memory of one self-attention module (batch 4, d=512, 8 heads) are measured over sequence lengths
L; vanilla attention is fitted with aL^2 + bL + c, the efficient one with dL + e (the time fits drop L=256), and
the efficiency length is the positive root of aL^2 + (b-d)L + (c-e) = 0: the length from which the efficient
mechanism is cheaper. `efficiency_length` is that recipe as a pure function (numpy least squares).

    python -m bench.efficiency                                   # CPU default: L 256..1024, one pattern each
    python -m bench.efficiency --lengths 256 512 1024 2048 4096 8192 --patterns NS CS NC CC --repeats 100  # GPU
    python -m bench.efficiency --mechanisms performer abc --backward
    python -m bench.efficiency --refit bench/efficiency_cpu.json                # fits again, no measuring

Every mechanism runs through its registry entry, `spec.fn(q, k, v, causal=..., **spec.defaults)`, the same call
and default options the CAB pattern tests use (attnx/testing/patterns.py). The module is x [B, L, 512] ->
q/k/v projections -> attention [B, L, 8, 64] -> output projection (`--attention-only` drops the projections).
Cross patterns (NC, CC) use a second input of length S = L. Vanilla is softmax attention with
`--vanilla-implementation` (default "xla": the [L, L] score matrix is materialised, as CAB's vanilla does), in
the same pattern. Time is the mean of the inter-quartile latencies over `--repeats` calls (CAB: 100) after one
warm-up call; memory is what XLA's compiler reports for the compiled program (temporaries + arguments + outputs,
as bench/attention.py reports it: deterministic on every backend).

JSON rows: mechanism, pattern, lengths, time_s, memory_bytes, efficiency_length_time/_memory (null: the efficient
curve never wins in the fit, or the fit could not be made, then fit_error says why), the published CAB values,
the fit coefficients, a note when a curve stopped early, and skipped (the reason a mechanism did not run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from typing import NamedTuple

import numpy as np

# Published CAB efficiency lengths (time / memory), CAB README leaderboard 2022-11-16 (spec §6 f), by attnx name.
PUBLISHED = {"abc": (1877, 70), "performer": (2361, 37), "cosformer": (2539, 164), "lara": (2541, 68),
             "nystrom": (3045, 94), "probsparse": (3450, 281), "sliding_window": (4195, 1169),
             "longshort": (5652, 342)}
PATTERNS = ("NS", "CS", "NC", "CC")


class EfficiencyFit(NamedTuple):
    """length: the efficiency length (math.inf when the efficient curve never stays below the vanilla one, 0.0 when
    it is below at every L > 0); vanilla: (a, b, c) of aL^2 + bL + c; efficient: (d, e) of dL + e; used: the
    lengths the fits used."""
    length: float
    vanilla: tuple
    efficient: tuple
    used: tuple


def _as_curve(name, values, n=None):
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"efficiency_length: {name} must be one-dimensional, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"efficiency_length: {name} has {arr.shape[0]} values but L has {n}; they must match")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"efficiency_length: {name} must be finite, got {arr.tolist()}")
    return arr


def efficiency_length(L, t_vanilla, t_eff, *, min_length: float = 0) -> EfficiencyFit:
    """CAB's efficiency length (Zhang et al., 2023, §4.3): fit vanilla with aL^2 + bL + c and the efficient
    mechanism with dL + e (least squares over the lengths >= `min_length`; CAB's time fit passes 257 to drop
    L=256), then return where the gap aL^2 + (b-d)L + (c-e) (vanilla minus efficient) turns positive for good:
    - a > 0 (vanilla grows quadratically, the normal case): the largest real root, from which the efficient one
      stays cheaper at every longer L (0.0 when the gap is positive at every L > 0);
    - a <= 0 (a vanilla fit that does not bend upwards: timing noise over a short range of L; it is trusted only
      up to the longest fitted length L_max): the start of the winning interval that holds L_max;
    - math.inf when the efficient one never wins (a <= 0 and it loses at L_max, or the gap is never positive).

    L, t_vanilla, t_eff: 1-D sequences of equal length; L positive and distinct; at least three lengths left
    after `min_length` (three coefficients)."""
    L = _as_curve("L", L)
    if L.size and (np.any(L <= 0) or len(set(L.tolist())) != L.size):
        raise ValueError(f"efficiency_length: L must hold distinct positive lengths, got {L.tolist()}")
    tv = _as_curve("t_vanilla", t_vanilla, L.size)
    te = _as_curve("t_eff", t_eff, L.size)
    if not isinstance(min_length, (int, float)) or not math.isfinite(min_length):
        raise ValueError(f"efficiency_length: min_length must be a finite number, got {min_length!r}")
    keep = L >= min_length
    if int(keep.sum()) < 3:
        raise ValueError(f"efficiency_length: needs at least 3 lengths >= min_length={min_length} for the "
                         f"quadratic fit, got {L[keep].tolist()} (L={L.tolist()})")
    Lk = L[keep]
    a, b, c = np.polyfit(Lk, tv[keep], 2)
    d, e = np.polyfit(Lk, te[keep], 1)
    gap = np.array([a, b - d, c - e])  # vanilla - efficient
    # Scale-free "zero": coefficients this small relative to the curves are rounding noise of the fit.
    tiny = 1e-12 * max(1.0, float(np.max(np.abs(tv))), float(np.max(np.abs(te))))
    length = _crossover(gap, tiny, float(Lk.max()))
    return EfficiencyFit(length, (float(a), float(b), float(c)), (float(d), float(e)), tuple(Lk.tolist()))


def _crossover(gap, tiny, scale) -> float:
    """Start of the interval of L >= 0 with gap(L) > 0 that holds L_end: L_end -> infinity when the gap bends
    upwards, else the longest fitted length `scale` (see efficiency_length); inf when gap(L_end) <= 0."""
    a, b, c = gap
    if abs(a) * scale ** 2 <= tiny:  # linear gap
        a = 0.0
        roots = [] if abs(b) * scale <= tiny else [-c / b]
    else:
        roots = [float(r.real) for r in np.roots(gap) if abs(r.imag) <= 1e-9 * max(1.0, abs(r.real))]
    if a > 0:
        return max([0.0] + roots)
    if a * scale ** 2 + b * scale + c <= 0:
        return math.inf
    return max([0.0] + [r for r in roots if r < scale])


# ---- the benchmark ------------------------------------------------------------------------------------------------


def _module(spec, pattern, args, vanilla=False):
    """f(x, y, weights) -> [B, L, D]: projections, the mechanism in `pattern`, output projection."""
    causal, cross = pattern in ("CS", "CC"), pattern in ("NC", "CC")
    kw = {"implementation": args.vanilla_implementation} if vanilla else dict(spec.defaults)
    N, H = args.heads, args.model_dim // args.heads

    def f(x, y, w):
        B, T = x.shape[:2]
        src = y if cross else x
        if args.attention_only:
            q, k, v = x, src, src  # already [B, L, N, H]
        else:
            q = (x @ w["q"]).reshape(B, T, N, H)
            k = (src @ w["k"]).reshape(B, src.shape[1], N, H)
            v = (src @ w["v"]).reshape(B, src.shape[1], N, H)
        out = spec.fn(q, k, v, causal=causal, **kw)
        if args.attention_only:
            return out
        return out.reshape(B, T, -1) @ w["o"][: out.shape[-2] * out.shape[-1]]
    return f


def _inputs(L, args, dtype):
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    D, N = args.model_dim, args.heads
    shape = (args.batch, L, N, D // N) if args.attention_only else (args.batch, L, D)
    x, y = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2))
    w = {n: jnp.asarray(rng.standard_normal((D, D)) / math.sqrt(D), dtype) for n in "qkvo"}
    return x, y, w


def iqr_mean(times) -> float:
    """Mean of the inter-quartile latencies, CAB's timing statistic: the sorted calls without the fastest and the
    slowest quarter (n/4 rounded, at least one call kept: 100 calls -> the middle 50, 5 -> 3, 3 -> the median)."""
    t = np.sort(np.asarray(times, np.float64))
    if t.ndim != 1 or t.size == 0:
        raise ValueError(f"iqr_mean: times must be a non-empty 1-D sequence, got shape {t.shape}")
    k = min(int(t.size / 4 + 0.5), (t.size - 1) // 2)
    return float(t[k:t.size - k].mean())


def measure(f, L, args, dtype):
    """(seconds, compiled bytes) of one configuration; raises what the mechanism raises."""
    import jax
    import jax.numpy as jnp

    x, y, w = _inputs(L, args, dtype)
    if args.backward:
        g = jax.grad(lambda x, y, w: jnp.sum(f(x, y, w).astype(jnp.float32) ** 2), argnums=(0, 1, 2))
        fn = jax.jit(g)
    else:
        fn = jax.jit(f)
    compiled = fn.lower(x, y, w).compile()
    mem = compiled.memory_analysis()
    nbytes = int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)
    jax.block_until_ready(compiled(x, y, w))
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(x, y, w))
        times.append(time.perf_counter() - t0)
    return iqr_mean(times), nbytes


def _curve(spec, pattern, args, dtype, vanilla=False):
    """Time and memory over args.lengths; stops at the first length whose call exceeds --max-call-seconds."""
    f = _module(spec, pattern, args, vanilla)
    lengths, secs, mems, note = [], [], [], None
    for L in args.lengths:
        s, m = measure(f, L, args, dtype)
        lengths.append(L), secs.append(s), mems.append(m)
        if s > args.max_call_seconds and L != args.lengths[-1]:
            note = f"stopped after L={L}: {s:.2f} s per call > --max-call-seconds {args.max_call_seconds}"
            break
    return lengths, secs, mems, note


def fit_row(row, vanilla_row, time_min_length):
    """Fill a measured row's efficiency lengths (time fit over L >= time_min_length, memory fit over all L), the
    fit coefficients (a, b, c) and (d, e) ({} when a fit could not be made) and fit_error, against the vanilla
    row of the same pattern (over the lengths both curves have)."""
    Ls = row["lengths"]
    fits = {}
    for key, unit, min_length in (("time", "time_s", time_min_length), ("memory", "memory_bytes", 0)):
        van = dict(zip(vanilla_row["lengths"], vanilla_row[unit]))
        common = [L for L in Ls if L in van]
        try:
            fits[key] = efficiency_length(common, [van[L] for L in common],
                                          [row[unit][Ls.index(L)] for L in common], min_length=min_length)
        except ValueError as err:
            fits[key] = str(err)
    errors = []
    for key, fit in fits.items():
        if isinstance(fit, str):
            row[f"efficiency_length_{key}"], row[f"fit_{key}"] = None, {}
            errors.append(f"{key}: {fit}")
        else:
            row[f"efficiency_length_{key}"] = None if math.isinf(fit.length) else round(fit.length, 1)
            row[f"fit_{key}"] = dict(vanilla=fit.vanilla, efficient=fit.efficient)
    row["fit_error"] = "; ".join(errors) or None
    return row


def refit(result, time_min_length):
    """Recompute every row's efficiency lengths of a saved result from its stored curves (no new measurement)."""
    vanilla = {r["pattern"]: r for r in result["rows"] if r["mechanism"] == "vanilla"}
    for row in result["rows"]:
        if row["mechanism"] != "vanilla" and not row.get("skipped"):
            fit_row(row, vanilla[row["pattern"]], time_min_length)
    result["settings"]["time_min_length"] = time_min_length
    return result


def _patterns_for(spec, args):
    supported = [p for p in PATTERNS if p in spec.patterns]
    if args.patterns == ["first"]:
        self_ = [p for p in ("NS", "CS") if p in supported]
        return self_[:1]
    return [p for p in args.patterns if p in supported]


def run(args):
    import jax.numpy as jnp

    import attnx

    dtype = jnp.dtype(args.dtype)
    names = args.mechanisms or attnx.list_attentions()
    softmax = attnx.get_attention("softmax")
    vanilla, rows = {}, []
    for name in names:
        spec = attnx.get_attention(name)
        pats = _patterns_for(spec, args)
        if not pats:
            rows.append(_row(name, "-", skipped=f"supports {sorted(spec.patterns)}, none of the patterns run "
                                                   f"({' '.join(args.patterns)})"))
            print(f"{name:<18} -  skipped: {rows[-1]['skipped']}", flush=True)
            continue
        for pat in pats:
            if pat not in vanilla:
                Ls, ts, ms, note = _curve(softmax, pat, args, dtype, vanilla=True)
                rows.append(_row("vanilla", pat, lengths=Ls, time_s=ts, memory_bytes=ms, note=note,
                                 implementation=args.vanilla_implementation))
                vanilla[pat] = rows[-1]
                _print(rows[-1])
            try:
                Ls, ts, ms, note = _curve(spec, pat, args, dtype)
            except Exception as err:  # noqa: BLE001 - a mechanism that cannot run generically is recorded, not fatal
                rows.append(_row(name, pat, skipped=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"))
                print(f"{name:<18} {pat}  skipped: {rows[-1]['skipped']}", flush=True)
                continue
            row = _row(name, pat, lengths=Ls, time_s=ts, memory_bytes=ms, note=note)
            fit_row(row, vanilla[pat], args.time_min_length)
            rows.append(row)
            _print(row)
    return rows


def _row(name, pattern, lengths=(), time_s=(), memory_bytes=(), note=None, skipped=None,
         efficiency_length_time=None, efficiency_length_memory=None, implementation="default"):
    pub = PUBLISHED.get(name)
    return dict(mechanism=name, pattern=pattern, implementation=implementation, lengths=list(lengths),
                time_s=list(time_s), memory_bytes=list(memory_bytes),
                efficiency_length_time=efficiency_length_time, efficiency_length_memory=efficiency_length_memory,
                published_time=pub[0] if pub else None, published_memory=pub[1] if pub else None,
                note=note, skipped=skipped)


def _print(r):
    def fmt(key):
        v = r.get(f"efficiency_length_{key}")
        return ("n/a" if not r.get(f"fit_{key}") else "never") if v is None else f"{v:.0f}"
    pub = f"{r['published_time']}/{r['published_memory']}" if r["published_time"] else "-"
    times = " ".join(f"{t * 1e3:.1f}" for t in r["time_s"])
    mib = " ".join(f"{m / 2 ** 20:.0f}" for m in r["memory_bytes"])
    el = "" if r["mechanism"] == "vanilla" else \
        f" EL time {fmt('time')} mem {fmt('memory')} (CAB {pub})"
    print(f"{r['mechanism']:<18} {r['pattern']}  ms [{times}]  MiB [{mib}]{el}" +
          (f"  ({r['note']})" if r.get("note") else ""), flush=True)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["time_s"]]
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    styles = ("-", "--", ":", "-.")
    for i, r in enumerate(done):
        vanilla = r["mechanism"] == "vanilla"
        kw = dict(color="black" if vanilla else plt.cm.tab20(i % 20), linestyle=styles[(i // 20) % 4],
                  linewidth=2.5 if vanilla else 1, marker="o", markersize=2, label=f"{r['mechanism']} {r['pattern']}")
        axes[0].plot(r["lengths"], r["time_s"], **kw)
        axes[1].plot(r["lengths"], [m / 2 ** 20 for m in r["memory_bytes"]], **kw)
    for ax, label in zip(axes, ("seconds (mean of inter-quartile calls)", "compiled memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=5, ncol=2, loc="upper left")
    fig.suptitle("CAB efficiency: attention module time and memory vs L (black: vanilla softmax)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 768, 1024])
    p.add_argument("--patterns", nargs="+", default=["first"], choices=["first", *PATTERNS],
                   help="CAB patterns to run for each mechanism that supports them; 'first' (default): NS, else CS")
    p.add_argument("--mechanisms", nargs="+", default=None, help="registry names (default: all)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--model-dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per point (CAB: 100)")
    p.add_argument("--backward", action="store_true", help="time forward+backward (grad w.r.t. inputs, weights)")
    p.add_argument("--attention-only", action="store_true", help="drop the q/k/v/out projections")
    p.add_argument("--vanilla-implementation", default="xla", help="softmax implementation of the vanilla curve")
    p.add_argument("--time-min-length", type=int, default=257, help="time fits use L >= this (CAB drops 256)")
    p.add_argument("--max-call-seconds", type=float, default=4.0,
                   help="stop a curve's longer lengths once one call takes longer than this")
    p.add_argument("--refit", default=None, metavar="JSON",
                   help="recompute the efficiency lengths of a saved result in place from its curves; no measuring")
    p.add_argument("--out", default="bench/out/efficiency.json")
    p.add_argument("--plot", default="bench/out/efficiency.png")
    args = p.parse_args(argv)
    for name in ("lengths", "repeats", "batch", "model_dim", "heads"):
        vals = getattr(args, name)
        if any(v <= 0 for v in (vals if isinstance(vals, list) else [vals])):
            p.error(f"--{name.replace('_', '-')} must be positive, got {vals}")
    if args.model_dim % args.heads:
        p.error(f"--model-dim {args.model_dim} must be divisible by --heads {args.heads}")
    if "first" in args.patterns and len(args.patterns) > 1:
        p.error(f"--patterns: 'first' cannot be combined with others, got {args.patterns}")
    args.lengths = sorted(set(args.lengths))
    return args


def main(argv=None):
    args = parse_args(argv)
    from bench.attention import _machine
    from bench.provenance import git_commit

    if args.refit:
        with open(args.refit) as fh:
            result = refit(json.load(fh), args.time_min_length)
        result["refit_commit"] = git_commit()  # "commit" stays the one that measured the curves
        for row in result["rows"]:
            if not row.get("skipped"):
                _print(row)
        with open(args.refit, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"# refitted {args.refit} (curves unchanged)")
        return result
    t0, commit = time.time(), git_commit()  # the code that measures (HEAD may move while a long run goes on)
    rows = run(args)
    settings = {k: (" ".join(map(str, v)) if isinstance(v, list) else v) for k, v in vars(args).items()
                if k not in ("out", "plot", "refit")}
    settings["memory"] = "XLA compiled memory analysis: temp + argument + output bytes"
    settings["time"] = "mean of inter-quartile latencies"
    settings["module"] = "attention only" if args.attention_only else "q/k/v/out projections + attention"
    settings["wall_s"] = round(time.time() - t0, 1)
    result = {"benchmark": "efficiency_length", "machine": _machine(), "date": datetime.date.today().isoformat(),
              "commit": commit, "settings": settings, "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    if args.plot:
        plot(rows, args.plot)
    print(f"# wrote {args.out}" + (f" and {args.plot}" if args.plot else "") + f" in {settings['wall_s']} s")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
