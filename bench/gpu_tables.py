"""Markdown tables and issue-7 goal lines from the rows of `bench/gpu_bench.py` (one dict per timed case)."""

from __future__ import annotations

from bench.gpu_harness import cell, markdown_table

MODES = ("fwd", "fwd+bwd")


def _find(rows, **match):
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _ok(rows, **match):
    r = _find(rows, **match)
    return r if r is not None and r["status"] == "ok" else None


def _ordered(values):
    return list(dict.fromkeys(values))


def softmax_tables(rows, matmul) -> list[str]:
    rows = [r for r in rows if r["section"] == "softmax"]
    out = []
    for H in _ordered(r["H"] for r in rows):
        sub = [r for r in rows if r["H"] == H]
        seqs = sorted({r["S"] for r in sub})
        body = []
        for causal in (False, True):
            for mode in (m for m in MODES if any(r["mode"] == m for r in sub)):  # --modes may leave one out
                for impl in _ordered(r["impl"] for r in sub):
                    cells = []
                    for S in seqs:
                        r = _find(sub, impl=impl, S=S, causal=causal, mode=mode)
                        text = cell(r, "tflops", "{:.3g}")
                        if r is not None and r["status"] == "ok" and "frac_matmul" in r:
                            text += f" ({100 * r['frac_matmul']:.0f}%)"
                        if r is not None and r.get("check", {}).get("ok") is False:
                            text += " WRONG"
                        cells.append(text)
                    body.append(["yes" if causal else "no", mode, impl] + cells)
        N, B = sub[0]["N"], {r["S"]: r["B"] for r in sub}
        out.append(f"### Softmax attention, head dim {H}, N = {N}, B·S = {B[seqs[0]] * seqs[0]}, bf16: TFLOP/s "
                   f"(share of the {matmul['size']}³ bf16 matmul rate, {matmul['flops_per_s'] / 1e12:.3g} TFLOP/s)\n\n"
                   + markdown_table(["causal", "pass", "implementation"] + [f"S={S}" for S in seqs], body))
    return out


def block_sparse_table(rows) -> list[str]:
    rows = [r for r in rows if r["section"] == "block_sparse"]
    if not rows:
        return []
    body = []
    for mode in MODES:
        dense = _ok(rows, mode=mode, sparsity=0.0)
        for r in (r for r in rows if r["mode"] == mode):
            speed = f"{dense['seconds'] / r['seconds']:.2f}x" if dense and r["status"] == "ok" else "-"
            body.append([mode, f"{r['sparsity']:.0%}", f"{r['density']:.3f}", cell(r, "seconds", "{:.4g}"),
                         cell(r, "tflops", "{:.3g}"), speed])
    r0 = rows[0]
    return [f"### Block-sparse attention ({r0['impl']}), S = {r0['S']}, N = {r0['N']}, H = {r0['H']}, blocks "
            f"{r0['block']}x{r0['block']}, random block mask (diagonal kept), bf16\n\n"
            + markdown_table(["pass", "sparsity", "density", "seconds", "effective TFLOP/s", "vs dense"], body)]


def linear_table(rows) -> list[str]:
    rows = [r for r in rows if r["section"] == "linear"]
    if not rows:
        return []
    seqs = sorted({r["S"] for r in rows})
    body = []
    for mode in MODES:
        for impl in _ordered(r["impl"] for r in rows if r["mode"] == mode):
            cells, rates = [], []
            for S in seqs:
                r = _find(rows, impl=impl, S=S, mode=mode)
                text = cell(r, "tokens_per_s", "{:.4g}") if r is None or r["status"] != "ok" else \
                    f"{r['tokens_per_s'] / 1e6:.3g}"
                dense = next((d for d in rows if d["mode"] == mode and d["S"] == S and d["status"] == "ok"
                              and d["impl"].startswith("dense_")), None)
                if r is not None and r["status"] == "ok":
                    rates.append(r["tokens_per_s"])
                    if dense is not None and not impl.startswith("dense_"):
                        text += f" ({dense['seconds'] / r['seconds']:.2f}x)"
                cells.append(text)
            flat = f"{max(rates) / min(rates):.2f}" if len(rates) > 1 else "-"
            body.append([mode, impl] + cells + [flat])
    r0 = rows[0]
    return [f"### Linear attention (Lightning Attention-2) vs causal dense flash, N = {r0['N']}, H = {r0['H']}, "
            f"B·S = {min(r['B'] * r['S'] for r in rows)} (B = 1 beyond), bf16: million tokens/s (speedup over "
            f"dense at the same S)\n\n"
            + markdown_table(["pass", "implementation"] + [f"S={S}" for S in seqs] + ["max/min"], body)]


def neighborhood_table(rows) -> list[str]:
    rows = [r for r in rows if r["section"] == "neighborhood"]
    if not rows:
        return []
    body = []
    for mode in MODES:
        bases = [_na_baseline(rows, mode, prefix) for prefix in ("masked_dense_", "dense_")]
        for r in (r for r in rows if r["mode"] == mode):
            speeds = [f"{b['seconds'] / r['seconds']:.2f}x" if b and r["status"] == "ok" else "-" for b in bases]
            body.append([mode, r["impl"], cell(r, "seconds", "{:.4g}"), cell(r, "tflops", "{:.3g}")] + speeds)
    r0 = rows[0]
    return [f"### Neighborhood attention 2-D, grid {r0['grid']}, kernel {r0['kernel']}, B = {r0['B']}, "
            f"N = {r0['N']}, H = {r0['H']}, bf16 (TFLOP/s counts the k² keys per query only; `dense_` is flash "
            f"attention with no mask, `masked_dense_` the same with the NA mask, which a block-skipping kernel "
            f"turns into live tiles)\n\n"
            + markdown_table(["pass", "implementation", "seconds", "TFLOP/s", "vs masked dense", "vs dense (no mask)"],
                             body)]


def _na_baseline(rows, mode, prefix):
    return next((r for r in rows if r["mode"] == mode and r["impl"].startswith(prefix) and r["status"] == "ok"),
                None)


def _unavailable(rows) -> dict:
    """(section, impl) -> reason, for implementations that were not available in any case of their section."""
    by = {}
    for r in rows:
        by.setdefault((r["section"], r["impl"]), []).append(r)
    return {key: rs[0].get("reason", "") for key, rs in by.items()
            if all(r["status"] == "not available" for r in rs)}


def section_tables(rows, matmul) -> str:
    """All tables; implementations that were not available anywhere in a section are listed below its table
    instead of filling it with n/a rows (the JSON keeps every row)."""
    gone = _unavailable(rows)
    kept = [r for r in rows if (r["section"], r["impl"]) not in gone]
    parts = []
    for section, build in (("softmax", lambda rs: softmax_tables(rs, matmul)), ("block_sparse", block_sparse_table),
                           ("linear", linear_table), ("neighborhood", neighborhood_table)):
        notes = [f"`{impl}` ({reason})" for (sec, impl), reason in gone.items() if sec == section]
        tables = build(kept)
        if notes:
            tables = (tables or [f"### {section}"]) + ["Not available in this run: " + "; ".join(notes)]
        parts += tables
    return "\n\n".join(parts)


def _verdict(value: float, goal: float, higher: bool = True) -> str:
    return "met" if (value >= goal if higher else value <= goal) else "not met"


def goal_lines(rows) -> list[str]:
    """The goals of issue 7, read off this run's rows (a goal whose cases did not run says so)."""
    lines = []
    soft = [r for r in rows if r["section"] == "softmax"]
    for S in (8192, 16384):
        for causal in (False, True):
            for mode in MODES:
                # the fastest pallas_gpu row, whatever its tile configuration ("pallas_gpu:block_kv=128,...")
                ours = min((r for r in soft if r["impl"].split(":")[0] == "pallas_gpu" and r["status"] == "ok"
                            and (r["H"], r["S"], r["causal"], r["mode"]) == (128, S, causal, mode)),
                           key=lambda r: r["seconds"], default=None)
                cudnn = _ok(soft, impl="cudnn", H=128, S=S, causal=causal, mode=mode)
                what = f"softmax H=128 S={S} causal={causal} {mode}"
                if ours and cudnn:
                    ratio = cudnn["seconds"] / ours["seconds"]
                    lines.append(f"# goal {what}: {ours['impl']} {ours['tflops']:.0f} vs cudnn {cudnn['tflops']:.0f} "
                                 f"TFLOP/s = {ratio:.2f}x (goal >= 1.0x): {_verdict(ratio, 1.0)}")
                else:
                    lines.append(f"# goal {what}: not measured in this run")
    sparse = [r for r in rows if r["section"] == "block_sparse"]
    for mode in MODES:
        dense, s90 = _ok(sparse, mode=mode, sparsity=0.0), _ok(sparse, mode=mode, sparsity=0.9)
        if dense and s90:
            ratio = dense["seconds"] / s90["seconds"]
            lines.append(f"# goal block-sparse 90% S={s90['S']} {mode}: {ratio:.2f}x over dense (goal >= 7x): "
                         f"{_verdict(ratio, 7.0)}")
        else:
            lines.append(f"# goal block-sparse 90% {mode}: not measured in this run")
    linear = [r for r in rows if r["section"] == "linear"]
    for mode in MODES:
        ours = [r for r in linear if r["impl"] == "lightning_pallas_gpu" and r["mode"] == mode and r["status"] == "ok"]
        if not ours:
            lines.append(f"# goal linear scan {mode}: lightning_pallas_gpu not measured in this run")
            continue
        top = max(ours, key=lambda r: r["S"])
        dense = next((d for d in linear if d["mode"] == mode and d["S"] == top["S"] and d["status"] == "ok"
                      and d["impl"].startswith("dense_")), None)
        if dense:
            ratio = dense["seconds"] / top["seconds"]
            lines.append(f"# goal linear scan {mode} S={top['S']}: {ratio:.2f}x faster than {dense['impl']} "
                         f"(goal >= 10x at 32k): {_verdict(ratio, 10.0)}")
        rates = [r["tokens_per_s"] for r in ours]
        if len(rates) < 2:
            lines.append(f"# goal linear scan {mode}: tokens/s flatness needs two or more lengths, got one")
            continue
        spread = max(rates) / min(rates) - 1
        lines.append(f"# goal linear scan {mode}: tokens/s spread {100 * spread:.0f}% over S "
                     f"{min(r['S'] for r in ours)}..{top['S']} (goal within 10% up to 64k): "
                     f"{_verdict(spread, 0.10, higher=False)}")
    na = [r for r in rows if r["section"] == "neighborhood"]
    for mode in MODES:
        base, unmasked = _na_baseline(na, mode, "masked_dense_"), _na_baseline(na, mode, "dense_")
        ours = [r for r in na if r["mode"] == mode and r["impl"].startswith("na_") and r["status"] == "ok"]
        if base and ours:
            best = min(ours, key=lambda r: r["seconds"])
            ratio = base["seconds"] / best["seconds"]
            also = f"; {unmasked['seconds'] / best['seconds']:.2f}x over {unmasked['impl']}" if unmasked else ""
            lines.append(f"# goal neighborhood 2-D {mode}: {best['impl']} {ratio:.2f}x over {base['impl']} "
                         f"(goal >= 5x): {_verdict(ratio, 5.0)}{also}")
        else:
            lines.append(f"# goal neighborhood 2-D {mode}: not measured in this run")
    return lines
