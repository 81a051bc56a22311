"""Regenerates `bench/RESULTS.md` from the benchmarks' JSON results and the hand-written notes.

    python -m bench.report            # writes bench/RESULTS.md
    python -m bench.report --check    # exits 1 when bench/RESULTS.md differs from what would be written

Every section of RESULTS.md is one benchmark of `BENCHMARKS`: its heading, then the prose of
`bench/notes/<name>.md` with the generated block (where the results come from: file, machine, date, commit; the tables
formatted from the JSON rows; the plot when its PNG exists; the goal lines the run printed) put in place of the line
`<!-- results -->` (or first, when the notes have no such line). A benchmark whose JSON is missing says "not run
yet" and shows no number of its own; a benchmark that writes no JSON at all (the numbers were recorded by hand) says
so. JSON files under bench/ that no entry names get a generic section (a table of their rows' scalar fields), so a
new benchmark appears in the report before it has a formatter of its own.

Nothing here measures anything: the numbers are the JSON files' and the notes'. The formatters mirror the tables
each benchmark's own script prints; the GPU tables are `bench/gpu_tables.py`'s, imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
from typing import Any, Callable, Sequence

BENCH = pathlib.Path(__file__).resolve().parent
MARKER = "<!-- results -->"
Blocks = list[str]


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _bold_max(cells: list[str], values: list[float | None]) -> list[str]:
    """Marks the cells that hold the column's largest value (ties all marked)."""
    real = [v for v in values if v is not None and not math.isnan(v)]
    top = max(real) if real else None
    return [f"**{c}**" if v is not None and v == top else c for c, v in zip(cells, values)]


def _rows(data: Any) -> list[dict]:
    """The list of result rows, whether the JSON is the standard {"rows": [...]} layout or a bare list."""
    return data if isinstance(data, list) else data["rows"]


def _goals(lines: Sequence[str]) -> Blocks:
    return ["Goal lines of the run:\n\n```\n" + "\n".join(lines) + "\n```"] if lines else []


# ---- one formatter per benchmark kind: JSON -> markdown blocks --------------------------------------------------


def attention_cpu(data: dict) -> Blocks:
    """`bench/attention.py` (issue 2): one row per (dtype, causal, T, implementation)."""
    rates = data.get("matmul_rate") or {}
    args = data.get("args", {})
    head = ("Matmul rate measured in the run: "
            + ", ".join(f"{name} {rate / 1e9:.1f} GFLOP/s" for name, rate in rates.items())
            + f"; B = {args.get('batch', '?')}, N = {args.get('heads', '?')}, H = {args.get('head_dim', '?')}, "
            f"backward {'yes' if args.get('backward') else 'no'}, {args.get('repeats', '?')} repeats.")
    body = []
    for r in _rows(data):
        front = [r["impl"], r["dtype"], "yes" if r["causal"] else "no", str(r["T"])]
        mib = f"{r['total_bytes'] / 2 ** 20:.1f}" if r.get("total_bytes") is not None else "-"
        if "seconds" not in r:
            body.append(front + [f"not run: {r.get('skipped', r.get('error', 'no time recorded'))}", "", "", "", mib])
            continue
        speed = r.get("speedup_vs_jax_nn")
        body.append(front + [f"{r['seconds']:.4f}", f"{r['tflops'] * 1e3:.1f}",
                             f"{100 * r['share_of_matmul_rate']:.0f}%", f"{speed:.2f}x" if speed is not None else "-",
                             mib])
    table = markdown_table(["impl", "dtype", "causal", "T", "seconds", "GFLOP/s", "% of matmul rate", "vs jax.nn",
                            "compiled MiB"], body)
    return [head, table] + _goals(data.get("goals", []))


def vision_digits(data: Any) -> Blocks:
    """`bench/vision_digits.py` (issue 6): one row per mechanism; softmax first, then by test accuracy."""
    rows = sorted(_rows(data), key=lambda r: (r["mechanism"] != "softmax", -r["test_accuracy"]))
    columns = [[_pct(r["test_accuracy"]) for r in rows], [_pct(r["test_accuracy_shift_averaged"]) for r in rows]]
    columns = [_bold_max(c, [r[k] for r in rows])
               for c, k in zip(columns, ("test_accuracy", "test_accuracy_shift_averaged"))]
    body = [[f"`{r['mechanism']}`", a, s, f"{r['images_per_second']:.0f}", f"{r['wall_s']:.0f}", str(r["steps"])]
            for r, a, s in zip(rows, *columns)]
    return [markdown_table(["mechanism", "test accuracy", "shift-averaged", "train images/s",
                            "wall (s, compile and evaluation included)", "steps"], body)]


def image_prompt(data: dict) -> Blocks:
    """`bench/image_prompt.py` (issue 6): per image-prompt scale lambda, without and with image-prompt guidance."""
    guidances = sorted({1.0, float(data["cfg_scale"])})
    share, fd = data["reference_class_share"], data["frechet_distance"]

    def fd_text(x: float) -> str:
        return f"{x:.1f}" if x >= 10 else f"{x:.2f}"

    columns = []
    for g in guidances:
        names = [f"lambda_{s:g}_cfg_{g:g}" for s in data["scales"]]
        shares = _bold_max([_pct(share[n]) if n in share else "" for n in names], [share.get(n) for n in names])
        columns.append([f"{text} / {fd_text(fd[n])}" if n in share else "not run" for text, n in zip(shares, names)])
    header = ["λ (image-prompt scale)"] + [
        "no guidance: share of samples classified as the reference's class / Fréchet distance" if g == 1.0
        else f"image-prompt guidance {g:g}" for g in guidances]
    main = markdown_table(header, [[f"{s:g}"] + [c[i] for c in columns] for i, s in enumerate(data["scales"])])
    head = (f"{data.get('num_references', '?')} references, {data.get('sampler', '?')} "
            f"{data.get('sampling_steps', '?')} steps; scoring classifier {_pct(data['classifier_test_accuracy'])} "
            f"and image encoder {_pct(data['encoder_test_accuracy'])} on real test images; "
            f"{data.get('seconds', float('nan')):.0f} s for the run.")
    per_class = data.get("per_class", {})
    blocks = [head, main]
    if per_class:
        width = max(len(v) for v in per_class.values())
        body = [[name.replace("lambda_", "λ ").replace("_cfg_", ", guidance ")] + [f"{100 * x:.0f}%" for x in v]
                for name, v in per_class.items()]
        blocks.append("Share classified as the reference's class, per class of the reference:\n\n"
                      + markdown_table(["sampling"] + [str(c) for c in range(width)], body))
    return blocks


def mqar(data: dict) -> Blocks:
    """`bench/tasks.py mqar` (issue 5): accuracy per (mechanism, d_model) row and (T, pairs) column."""
    results = data["results"]
    budget = data.get("budget", {})
    cells = sorted({(r["seq_len"], r["num_pairs"]) for r in results})
    mechanisms = list(dict.fromkeys(r["mechanism"] for r in results))
    widths = sorted({r["width"] for r in results})
    solved, most = budget.get("stop_accuracy", 1.0), budget.get("steps")
    mixture = budget.get("protocol") == "mixture"  # one run per row: its seconds and steps go in the first cell
    body = []
    for m in mechanisms:
        for w in widths:
            row = [m, str(w)]
            for i, (t, d) in enumerate(cells):
                r = next((r for r in results if (r["mechanism"], r["width"], r["seq_len"], r["num_pairs"])
                          == (m, w, t, d)), None)
                if r is None:
                    row.append("not run")
                elif "error" in r:
                    row.append(f"failed: {r['error'][:60]}")
                else:
                    acc = _pct(r["accuracy"])
                    acc = f"**{acc}**" if r["accuracy"] >= solved else acc
                    stop = f", stopped at {r['steps']} steps" if most and r["steps"] < most else ""
                    row.append(acc if mixture and i else f"{acc} ({r['seconds']:.0f} / {r['cpu_seconds']:.0f}{stop})")
            if any(c != "not run" for c in row[2:]):
                body.append(row)
    header = ["mechanism", "d_model"] + [
        f"T={t}, D={d}" + (": accuracy (wall / CPU s)" if i == 0 else "") for i, (t, d) in enumerate(cells)]
    head = ("Budget: " + ", ".join(f"{k} {v}" for k, v in budget.items() if v not in ([], (), None))
            + f". Bold: solved (>= {_pct(solved)})."
            + (" One training run per row (the cells' mixture): its wall / CPU seconds in the first column." if mixture
               else ""))
    blocks = [head, markdown_table(header, body)]
    if data.get("note"):
        blocks.append("Run note recorded in the JSON: " + data["note"])
    return blocks


def gpu(data: dict) -> Blocks:
    """`bench/gpu_bench.py` (issue 7): the tables and goal lines of `bench/gpu_tables.py`."""
    from bench import gpu_tables  # imports jax (through gpu_harness): only when a GPU JSON is present

    head = (f"`--budget {data.get('args', {}).get('budget')}`: {data.get('elapsed_s', '?')} s, "
            f"{data.get('skipped_for_budget', 0)} cases skipped for the budget (`skip`). "
            f"Convention: {data.get('convention', 'not recorded')}.")
    return [head, gpu_tables.section_tables(data["rows"], data["matmul"])] + _goals(gpu_tables.goal_lines(data["rows"]))


def mfu(data: dict) -> Blocks:
    """`bench/mfu.py --json` (issue 8): the table `bench/mfu.py` prints (its `markdown_table`), rebuilt here."""
    peaks = data.get("peaks_flops", {})
    head = (f"{data.get('dtype', '?')}, batch {data.get('batch', '?')}, LLM sequence {data.get('seq', '?')}, "
            f"{data.get('repeats', '?')} timed steps; best measured matmul rate: "
            + ", ".join(f"{k} {v / 1e12:.4g} TFLOP/s" for k, v in peaks.items()) + ".")
    body = []
    for r in data["rows"]:
        if "error" in r or "skipped" in r:
            what = f"failed: {r['error'][:80]}" if "error" in r else f"skipped: {r['skipped']}"
            body.append([r["family"], r["size"], what, "", "", "", "", ""])
            continue
        ratio = "n/a" if r.get("xla_ratio") is None else f"{r['xla_ratio']:.3f}"
        body.append([r["family"], r["size"], f"{r['params'] / 1e6:,.2f}M", f"{r['tokens']:,}", f"{r['step_ms']:,.1f}",
                     f"{r['tflops']:.4g}", ratio, f"{100 * r['mfu']:.1f}"])
    return [head, markdown_table(["family", "size", "params", "tokens/step", "step ms", "model TFLOP/s",
                                  "XLA / analytic", "MFU %"], body)]


def listops(data: dict) -> Blocks:
    """`bench/listops.py` (issue 10): test accuracy per mechanism against the majority-class baseline."""
    body = [[f"`{r['mechanism']}`", _pct(r["accuracy"]), f"{r['wall_s']:.0f}", f"{r['cpu_s']:.0f}"]
            for r in data["rows"]]
    if "majority_baseline" in data:
        body.append([f"majority class ({data.get('majority_label', '?')})", _pct(data["majority_baseline"]), "", ""])
    blocks = [markdown_table(["mechanism", "test accuracy", "wall (s)", "CPU (s)"], body)]
    if data.get("data"):
        blocks.insert(0, "Data: " + ", ".join(f"{k} {_scalar(v)}" for k, v in data["data"].items())
                      + f"; load average {_scalar(data.get('load_average_start', '?'))} at the start, "
                      f"{_scalar(data.get('load_average_end', '?'))} at the end.")
    return _settings(data) + blocks


def efficiency(data: dict) -> Blocks:
    """`bench/efficiency.py` (issue 10): CAB's efficiency length per mechanism and pattern, against vanilla softmax."""
    rows = data["rows"]
    lengths = sorted({n for r in rows for n in r.get("lengths", [])})

    def length(v: float | None) -> str:
        return "never" if v is None else f"{v:.0f}"

    body = []
    for r in rows:
        front = [f"`{r['mechanism']}`", r["pattern"]]
        if r.get("skipped"):
            body.append(front + [f"skipped: {r['skipped'][:100]}"] + [""] * (len(lengths) + 3))
            continue
        times = dict(zip(r["lengths"], r["time_s"]))
        memory = " / ".join(f"{m / 2 ** 20:.0f}" for m in r["memory_bytes"])
        ours = "" if r["mechanism"] == "vanilla" else \
            f"{length(r.get('efficiency_length_time'))} / {length(r.get('efficiency_length_memory'))}"
        cab = f"{r['published_time']} / {r['published_memory']}" if r.get("published_time") else "-"
        note = "; ".join(n for n in (r.get("note"), r.get("fit_error")) if n)
        body.append(front + [f"{1e3 * times[n]:.1f}" if n in times else "-" for n in lengths]
                    + [memory, ours, cab, note])
    header = ["mechanism", "pattern"] + [f"ms at L={n}" for n in lengths] + [
        "compiled MiB per L", "efficiency length: time / memory", "CAB's published (time / memory)", "note"]
    note = [f"Recorded with the results: {data['commit_note']}"
            + (f" (refit commit {data['refit_commit']})." if data.get("refit_commit") else "")] \
        if data.get("commit_note") else []
    return _settings(data) + note + [markdown_table(header, body)]


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def generic(data: Any) -> Blocks:
    """Any JSON with a list of row dicts: one column per scalar field, in order of first appearance."""
    rows = [r for r in _rows(data) if isinstance(r, dict)]
    if not rows:
        return ["(no rows in the JSON)"]
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, (dict, list))))
    return _settings(data) + [markdown_table(keys, [[_scalar(r[k]) if k in r else "-" for k in keys] for r in rows])]


def _settings(data: Any) -> Blocks:
    """The standard layout's "settings" object as one line (none when absent)."""
    settings = data.get("settings") if isinstance(data, dict) else None
    if not isinstance(settings, dict) or not settings:
        return []
    return ["Settings: " + ", ".join(f"{k} {_scalar(v)}" for k, v in settings.items()) + "."]


# ---- the benchmarks, in the order of RESULTS.md ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One section. `json` None: the benchmark writes no JSON (its numbers are hand-recorded in the notes)."""
    name: str
    title: str
    json: str | None = None
    format: Callable[[Any], Blocks] | None = None
    plots: tuple[str, ...] = ()
    command: str | None = None


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("attention_cpu", "Attention (CPU) — issue 2", "attention_cpu.json", attention_cpu,
              ("attention.png",), "python -m bench.attention --out bench/attention_cpu.json"),
    Benchmark("model_zoo", "Model zoo experiments (CPU) — issue 4"),
    Benchmark("vision_digits", "Digits ViT at patch 1 for every vision mechanism (CPU) — issue 6",
              "vision_digits.json", vision_digits, ("vision_digits.png",),
              "python -m bench.vision_digits --out bench/vision_digits.json"),
    Benchmark("image_prompt", "Digits DiT with image-prompt conditioning (CPU) — issue 6", "image_prompt.json",
              image_prompt, ("image_prompt_samples.png",),
              "python -m bench.image_prompt, then its workdir's image_prompt.json copied here"),
    Benchmark("mqar", "MQAR (CPU) — issue 5: the grid (Based's mixture protocol, muP learning rates) and the "
              "probes that led to it", "mqar.json", mqar, ("mqar.png",),
              "python -m bench.tasks mqar --out bench"),
    Benchmark("listops", "ListOps (CPU) — issue 10", "listops.json", listops, ("listops.png",),
              "python -m bench.listops"),
    Benchmark("efficiency_cpu", "CAB efficiency length (CPU) — issue 10", "efficiency_cpu.json", efficiency,
              ("efficiency_cpu.png",),
              "python -m bench.efficiency --out bench/efficiency_cpu.json --plot bench/efficiency_cpu.png"),
    Benchmark("efficiency_cpu_cab", "CAB efficiency length of CAB's published mechanisms (CPU) — issue 10",
              "efficiency_cpu_cab.json", efficiency, ("efficiency_cpu_cab.png",),
              "python -m bench.efficiency --mechanisms <CAB's eight> --out bench/efficiency_cpu_cab.json"),
    Benchmark("analysis", "Looking inside trained tiny models (CPU) — issue 10"),
    Benchmark("train_step", "Train step (CPU)"),
    Benchmark("ring_long", "Ring attention over 8 CPU devices — issue 8"),
    Benchmark("mfu", "Model FLOPs utilisation of the train step (CPU) — issue 8", "mfu.json", mfu, (),
              "python -m bench.mfu --json bench/mfu.json"),
    Benchmark("gpu_h200", "GPU: first run of `bench/gpu.sh` (NVIDIA H200) — issue 7", "gpu_h200.json", gpu, (),
              "bash bench/gpu.sh"),
)


def _machine(data: Any) -> str:
    m = data.get("machine") if isinstance(data, dict) else None
    if isinstance(m, dict):
        return ", ".join(f"{k} {v}" for k, v in m.items()
                         if not isinstance(v, (dict, list)) and k not in ("hostname", "commit") and v is not None)
    return str(m) if m else "not recorded"


def provenance(file: str, data: Any) -> str:
    meta = data if isinstance(data, dict) else {}
    machine = meta.get("machine")
    commit = meta.get("commit") or (machine.get("commit") if isinstance(machine, dict) else None)
    return (f"Results: `bench/{file}` — machine: {_machine(data)}; date: {meta.get('date') or 'not recorded'}; "
            f"commit: {commit or 'not recorded'}.")


def generated(bench: Benchmark, bench_dir: pathlib.Path, has_notes: bool = False) -> str:
    """The generated block of one benchmark: never a number that its JSON does not hold."""
    if bench.json is None:
        return ("*This benchmark writes no JSON: the numbers below were recorded by hand "
                f"(`bench/notes/{bench.name}.md`).*")
    path = bench_dir / bench.json
    if not path.exists():
        how = f" (`{bench.command}` writes it)" if bench.command else ""
        hand = " The numbers below were recorded by hand, not generated." if has_notes else ""
        return f"**Not run yet:** `bench/{bench.json}` is missing{how}.{hand}"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return f"**Not run yet:** `bench/{bench.json}` could not be read ({type(error).__name__}: {error})."
    try:
        blocks = (bench.format or generic)(data)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        blocks = [f"(The `{bench.name}` formatter does not understand this JSON: {type(error).__name__}: {error}; "
                  "generic table.)"] + generic(data)
    blocks = [provenance(bench.json, data)] + blocks
    blocks += [f"![{bench.name}]({p})" for p in bench.plots if (bench_dir / p).exists()]
    return "\n\n".join(blocks)


def section(bench: Benchmark, bench_dir: pathlib.Path) -> str:
    notes_path = bench_dir / "notes" / f"{bench.name}.md"
    notes = notes_path.read_text().strip() if notes_path.exists() else ""
    block = generated(bench, bench_dir, bool(notes))
    if MARKER in notes:
        body = notes.replace(MARKER, block, 1)
    else:
        body = "\n\n".join(p for p in (block, notes) if p)
    return f"## {bench.title}\n\n{body}\n"


def extra_benchmarks(bench_dir: pathlib.Path, known: Sequence[Benchmark]) -> list[Benchmark]:
    """JSON files directly under bench/ that no entry names: a generic section each."""
    named = {b.json for b in known}
    extra = []
    for path in sorted(bench_dir.glob("*.json")):
        if path.name in named:
            continue
        try:
            title = json.loads(path.read_text()).get("benchmark") or path.stem
        except (OSError, ValueError, AttributeError):
            title = path.stem
        extra.append(Benchmark(path.stem, f"{title} (`bench/{path.name}`)", path.name, generic,
                               (path.stem + ".png",)))
    return extra


def render(bench_dir: pathlib.Path = BENCH, benchmarks: Sequence[Benchmark] = BENCHMARKS) -> str:
    intro = bench_dir / "notes" / "intro.md"
    head = ("# Benchmark results\n\n*Generated by `python -m bench.report` from the JSON results under bench/ and the "
            "notes in bench/notes/: edit those, not this file.*\n")
    if intro.exists():
        head += "\n" + intro.read_text().strip() + "\n"
    parts = [head] + [section(b, bench_dir) for b in list(benchmarks) + extra_benchmarks(bench_dir, benchmarks)]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the file differs from what would be written")
    parser.add_argument("--bench-dir", default=str(BENCH), help="folder of the JSON files and notes/ (default: bench/)")
    parser.add_argument("--out", default=None, help="file to write or check (default: <bench-dir>/RESULTS.md)")
    args = parser.parse_args(argv)
    bench_dir = pathlib.Path(args.bench_dir)
    if not bench_dir.is_dir():
        parser.error(f"--bench-dir {args.bench_dir!r} is not a folder")
    out = pathlib.Path(args.out) if args.out else bench_dir / "RESULTS.md"
    text = render(bench_dir)
    if args.check:
        if not out.exists() or out.read_text() != text:
            print(f"{out} is stale: run `python -m bench.report` to regenerate it", file=sys.stderr)
            return 1
        print(f"{out} is up to date")
        return 0
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
