"""Task-quality benchmarks. `mqar`: Zoology's multi-query associative recall over a grid of sequence lengths,
key-value pairs, model widths and attention mechanisms (Arora et al., 2023, arXiv 2312.04927, §3-4, Fig. 2; the
Based paper's Fig. 2 protocol, Arora et al., 2024, arXiv 2402.18668).

    nice -n 5 python -m bench.tasks mqar --jobs 2 [--quick] [--mechanisms softmax based ...] [--widths 64 128]
        [--cells 64x4 128x8] [--steps 2000] [--protocol mixture|per_cell] [--learning-rate 6e-3]
        [--matrix-lr-base-width 32] [--positions learned] [--warmup 0.1] [--untied] [--replot]

Protocol (`--protocol mixture`, the default): as the Based paper's Fig. 2 sweep (zoology
`experiments/paper_configs/arxiv24_based_figure2/configs.py`), one model per (mechanism, d_model) is trained on
the union of the cells' training sets (20k examples of (64, 4), 4k of each longer cell: Based's 100k / 20k / 20k
ratio) and scored on each cell's held-out set; each step draws 48 / 8 / 4 rows of the three lengths. `per_cell`
trains one model per cell, as Zoology's ICLR Fig. 2 sweep. Why mixture: per cell, softmax at (128, 8) stayed at
chance (loss ln 256) or on the 1/D plateau for 1,000-1,900 steps at every setting tried, while the mixture's short
examples teach the recall circuit, which then serves the longer cells (softmax, d_model 128: 99.7 / 99.4 / 98.8%
after 700 steps; bench/RESULTS.md).

Model (bench/mqar_setup.py): the project's LLM with 2 layers, no MLP, one head for the exact mechanisms, weights
re-drawn as Zoology's `_init_weights` (`zoology_init`: normal(0, 0.02) matrices, output projections
0.02 / sqrt(2 L)), tied embeddings (as Zoology); the final norm starts at gain 1 for softmax and sqrt(d_model),
Zoology's initial logit scale under our tied output (which divides by sqrt(d_model)), for the other mechanisms: each
one's better setting in a d_model 64 probe (`--final-norm-gain auto`, mqar_setup.MECHANISMS). Departures from
Zoology's model: rotary positions instead of learned absolute ones (`--positions learned` restores Zoology's),
RMSNorm instead of LayerNorm, no attention/embedding dropout (0.1 there), and the exact baselines have no BaseConv
layer (Based's Fig. 2 puts one before every mixer; Zoology's Fig. 2 attention has none). Per mechanism:
sliding_window sees 16 keys; based is Zoology's Hybrid[BaseConv (k = 3), Based] with 16 Taylor features (Zoology's
Fig. 2 config: 8); performer uses 64 random features; moh routes 2 of 3 heads around 1 shared head (4 heads);
lightning is TransNormerLLM's mixer (Lightning attention with its per-layer decay, SRMSNorm and output gate;
Zoology has no Lightning baseline, and the bare function, which has neither a normaliser nor a norm, did not learn).

Training: AdamW (wd 0.1, 10% linear warmup then cosine to 0 over `--steps`; Zoology: no warmup, cosine over 64
epochs, lr swept over logspace(-4, -2, 4)) with muP's width rule: the embedding, norms and positions at the base lr
(6e-3), every other matrix at lr * 32 / d_model (`matrix_learning_rate_labels` says why: with one lr, d_model 128
never left the plateau). Cross-entropy on the query positions only (Zoology's -100 labels), averaged over every
query of the step; accuracy = share of query positions whose argmax is the paired value, on held-out examples of
other seeds (1,000 x 64 / T per cell: 4,000 queries each), checked every `steps_per_call` steps (that many optimizer
steps run as one compiled lax.scan); a run stops once every cell reaches 99%, as Zoology's early stopping does.
Budget (CPU): vocabulary 512 (Zoology 8,192: with 20k examples each value token is then seen too rarely to learn its
embedding), 28k training examples (Based: 140k+), at most 2,000 steps of 64 rows (Zoology: batch 512 at T <= 128
and 256 at T = 256, up to 64 epochs). `--jobs N` runs training runs in N worker processes with single-threaded XLA
(two single-threaded runs use two cores better than one two-threaded run at these sizes). Each run records wall
and CPU (process_time) seconds and the load average. See bench/RESULTS.md.
"""

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bench import report
from bench.mqar_setup import (CELLS, MECHANISMS, Budget, final_norm_gain_for, model_config, optimizer_for,
                               query_rows, use_learned_positions, zoology_init)
from bench.provenance import git_commit
from bench.scanned_training import scanned_train_steps, shuffled_batches
from models.llm import LLM
from train.data.mqar import mqar


def training_plan(cells, budget: Budget) -> list[tuple[int, int, int, int]]:
    """(T, D, training examples, rows per step) per cell of one training run. mixture: the shortest cell has
    `train_examples`, each longer one a fifth of that (Based's 100k / 20k / 20k); a step takes 3/4 of `batch_size`
    rows from the shortest cell and, from each longer cell, the tokens of batch_size / 4 rows of 64 (48 / 8 / 4 rows
    at batch 64). Why not rows in the examples' ratio (46 / 9 / 9): the long cells then carried 54% of the step's
    queries, and softmax at d_model 64 sat at chance (loss ln 256) for 1,100 steps where 48 / 8 / 4 had solved 97 /
    93 / 84% by 700. per_cell (one cell): batch_size * 64 / T rows."""
    cells = sorted(cells)
    if budget.protocol == "per_cell" or len(cells) == 1:
        if len(cells) != 1:
            raise ValueError(f"protocol 'per_cell' trains one cell at a time, got {len(cells)} cells")
        (seq_len, num_pairs), = cells
        return [(seq_len, num_pairs, budget.train_examples, max(1, budget.batch_size * 64 // seq_len))]
    (short_len, short_pairs), longer = cells[0], cells[1:]
    plan = [(short_len, short_pairs, budget.train_examples, max(1, 3 * budget.batch_size // 4))]
    return plan + [(t, d, max(1, budget.train_examples // 5), max(1, budget.batch_size * 64 // (4 * t)))
                   for t, d in longer]


def train_mqar(mechanism: str, width: int, cells, budget: Budget, seed: int = 0, verbose: bool = False) -> list[dict]:
    """Trains one model on the cells' training sets (`training_plan`) and returns one result per cell: held-out
    accuracy (share of query positions whose argmax is the paired value), steps, seconds of the whole run."""
    plan = training_plan(cells, budget)
    train = [mqar(n, t, d, budget.vocab_size, seed=seed + 10 * i) for i, (t, d, n, _) in enumerate(plan)]
    # Test examples scale as the per-cell batch (1,000 at T = 64): every cell scores 4,000 query positions, and a
    # check costs the same forward tokens.
    tests = [mqar(max(1, budget.test_examples * 64 // t), t, d, budget.vocab_size, seed=seed + 10 * i + 1)
             for i, (t, d, _, _) in enumerate(plan)]
    train_x, train_y = (tuple(jnp.asarray(pair[k]) for pair in train) for k in (0, 1))
    model = LLM(model_config(mechanism, width, budget.vocab_size, budget.tie_embeddings), rngs=nnx.Rngs(seed))
    if budget.init == "zoology":
        zoology_init(model, jax.random.key(seed), std=budget.init_std,
                     final_norm_gain=final_norm_gain_for(mechanism, budget))
    if budget.positions == "learned":
        use_learned_positions(model, max(t for t, *_ in plan), jax.random.key(seed + 7))
    steps = budget.steps
    optimizer, learning_rate, matrix_rate = optimizer_for(model, budget, width, steps)
    graphdef, state = nnx.split((model, optimizer))
    pairs = [d for _, d, _, _ in plan]

    def loss_fn(model, xs, ys):  # the mean over every scored query of the step, whatever its length
        total = sum(optax.softmax_cross_entropy_with_integer_labels(*query_rows(model, x, y, d)).sum()
                    for x, y, d in zip(xs, ys, pairs))
        return total / sum(x.shape[0] * d for x, d in zip(xs, pairs))

    train_steps = scanned_train_steps(graphdef, loss_fn)

    @functools.partial(jax.jit, static_argnums=3)
    def correct(state, x, y, num_pairs):
        model, _ = nnx.merge(graphdef, state)
        logits, targets = query_rows(model, x, y, num_pairs)
        return jnp.sum(jnp.argmax(logits, -1) == targets)

    def accuracies(state):
        return [sum(int(correct(state, x[i : i + 250], y[i : i + 250], d)) for i in range(0, len(x), 250))
                / (len(x) * d) for (x, y), d in zip(tests, pairs)]

    began, cpu_began, load_began = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    batches = [shuffled_batches(n, steps, rows, seed + i) for i, (_, _, n, rows) in enumerate(plan)]
    done, loss, scores = 0, float("nan"), [0.0] * len(plan)
    while done < steps:
        chunk = tuple(jnp.asarray(b[done : done + budget.steps_per_call]) for b in batches)
        state, losses = train_steps(state, train_x, train_y, chunk)
        done += len(chunk[0])
        loss, scores = float(losses[-1]), accuracies(state)
        if verbose:
            print(f"  {mechanism} d={width} step {done:6d}  loss {loss:.3f}  accuracy "
                  + " / ".join(f"{100 * a:5.1f}%" for a in scores)
                  + f"  {time.perf_counter() - began:.0f} s, {time.process_time() - cpu_began:.0f} CPU s", flush=True)
        if min(scores) >= budget.stop_accuracy or not np.isfinite(loss):  # a diverged run cannot recover
            break
    common = {"mechanism": mechanism, "width": width, "protocol": budget.protocol, "learning_rate": learning_rate,
              "matrix_learning_rate": matrix_rate, "final_loss": loss, "steps": done,
              "seconds": time.perf_counter() - began, "cpu_seconds": time.process_time() - cpu_began,
              "load_average": [load_began, os.getloadavg()[0]]}
    return [dict(common, seq_len=t, num_pairs=d, train_examples=n, batch_size=rows, accuracy=score)
            for (t, d, n, rows), score in zip(plan, scores)]


def plot(results: list[dict], widths, cells, mechanisms, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(widths), figsize=(5 * len(widths), 3.6), sharey=True, squeeze=False)
    for axis, width in zip(axes[0], widths):
        for mechanism in mechanisms:
            points = [r for r in results if r["mechanism"] == mechanism and r["width"] == width]
            points.sort(key=lambda r: r["seq_len"])
            axis.plot([f"{r['seq_len']}/{r['num_pairs']}" for r in points], [100 * r["accuracy"] for r in points],
                      marker="o", label=mechanism)
        axis.set_title(f"d_model = {width}")
        axis.set_xlabel("sequence length / key-value pairs")
        axis.set_ylim(0, 102)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy (%)")
    axes[0][-1].legend(fontsize=8, loc="center right")  # the curves sit near 0% and 100%
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _run_worker(job) -> list[dict]:
    """One training run in a worker process (module level, so that a spawned process can import it)."""
    (mechanism, width, cells), budget, verbose = job
    try:
        return train_mqar(mechanism, width, cells, budget, verbose=verbose)
    except Exception as error:  # one broken run is reported in the table, not the end of the grid
        return [{"mechanism": mechanism, "width": width, "seq_len": t, "num_pairs": d,
                 "error": f"{type(error).__name__}: {error}", "accuracy": float("nan"), "final_loss": float("nan"),
                 "steps": 0, "seconds": 0.0, "cpu_seconds": 0.0, "load_average": list(os.getloadavg()[:1]) * 2}
                for t, d in cells]


def _write(out: pathlib.Path, budget: Budget, results: list[dict], began: float, jobs: int, commit: str) -> None:
    (out / "mqar.json").write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "commit": commit,
        "budget": dataclasses.asdict(budget), "jobs": jobs, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "results": results, "wall_seconds": time.perf_counter() - began}, indent=1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tasks", description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=["mqar"])
    parser.add_argument("--mechanisms", nargs="+", default=list(MECHANISMS), choices=list(MECHANISMS))
    parser.add_argument("--widths", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--cells", nargs="+", default=[f"{t}x{d}" for t, d in CELLS],
                        help="sequence length x key-value pairs, e.g. 64x4 128x8")
    parser.add_argument("--quick", action="store_true", help="one small cell and budget: a smoke test")
    parser.add_argument("--protocol", choices=["mixture", "per_cell"], default=Budget.protocol,
                        help="mixture: one model per mechanism and width trained on all cells (Based's Fig. 2); "
                             "per_cell: one model per cell (Zoology's Fig. 2)")
    parser.add_argument("--steps", type=int, default=Budget.steps, help="most optimizer steps per training run")
    parser.add_argument("--train-examples", type=int, default=Budget.train_examples)
    parser.add_argument("--learning-rate", type=float, default=Budget.learning_rate)
    parser.add_argument("--width-learning-rate", nargs="+", default=[], metavar="WIDTH=LR",
                        help="per-width learning rates, e.g. 64=3e-3 128=1e-3 (others use --learning-rate)")
    parser.add_argument("--matrix-lr-base-width", type=int, default=Budget.matrix_lr_base_width,
                        help="matrices train at lr * this / d_model (muP's Adam rule); 0: one lr for every parameter")
    parser.add_argument("--vocab-size", type=int, default=Budget.vocab_size)
    parser.add_argument("--batch-size", type=int, default=Budget.batch_size,
                        help="rows per step: split over the cells (mixture) or at T = 64, scaled by 64/T (per_cell)")
    parser.add_argument("--init", choices=["zoology", "model"], default=Budget.init,
                        help="zoology: Zoology's normal(0.02) weights (default); model: the LLM's own init")
    parser.add_argument("--final-norm-gain", choices=["auto", "one", "sqrt"], default=Budget.final_norm_gain,
                        help="with --init zoology: the final norm's initial gain: auto (default; sqrt(d_model) for "
                             "based, 1 otherwise), one, or sqrt (Zoology's initial logit scale under our tied "
                             "1/sqrt(d) output) for every mechanism")
    parser.add_argument("--positions", choices=["rope", "learned"], default=Budget.positions,
                        help="rope: rotary (the LLM's); learned: Zoology's learned absolute positions, no rotary")
    parser.add_argument("--untied", action="store_true",
                        help="a separate output matrix (Zoology ties; ours divides the tied output by sqrt(d_model))")
    parser.add_argument("--init-std", type=float, default=Budget.init_std,
                        help="with --init zoology: the weights' standard deviation (Zoology: 0.02)")
    parser.add_argument("--warmup", type=float, default=Budget.warmup, help="share of steps with linear warmup")
    parser.add_argument("--jobs", type=int, default=1,
                        help="training runs in this many worker processes, each with single-threaded XLA")
    parser.add_argument("--verbose", action="store_true", help="print loss and accuracy every steps_per_call steps")
    parser.add_argument("--out", default="bench/out/mqar")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the table and plot from OUT/mqar.json (e.g. of a run stopped early)")
    args = parser.parse_args(argv)
    if args.replot:
        saved = json.loads((pathlib.Path(args.out) / "mqar.json").read_text())
        results = saved["results"]
        widths = sorted({r["width"] for r in results})
        cells = sorted({(r["seq_len"], r["num_pairs"]) for r in results})
        mechanisms = [m for m in MECHANISMS if any(r["mechanism"] == m for r in results)]
        plot(results, widths, cells, mechanisms, pathlib.Path(args.out) / "mqar.png")
        print("\n\n".join(report.mqar(saved)))
        return
    try:
        width_lrs = tuple((int(w), float(lr)) for w, lr in (item.split("=") for item in args.width_learning_rate))
        cells = tuple(tuple(int(part) for part in cell.split("x")) for cell in args.cells)
    except ValueError:
        parser.error(f"--cells: expected LENGTHxPAIRS items such as 64x4, got {args.cells}; --width-learning-rate: "
                     f"expected WIDTH=LR items, got {args.width_learning_rate}")
    budget = Budget(protocol=args.protocol, train_examples=args.train_examples, steps=args.steps,
                    learning_rate=args.learning_rate,
                    width_learning_rates=width_lrs, matrix_lr_base_width=args.matrix_lr_base_width,
                    vocab_size=args.vocab_size, batch_size=args.batch_size,
                    init=args.init, final_norm_gain=args.final_norm_gain, positions=args.positions,
                    init_std=args.init_std, warmup=args.warmup, tie_embeddings=not args.untied)
    if args.quick:
        budget = dataclasses.replace(budget, train_examples=512, test_examples=250, steps=8, steps_per_call=4)
        cells = CELLS[:2]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"MQAR on {platform.processor() or platform.machine()} ({os.cpu_count()} cores), jax {jax.__version__}, "
          f"{args.jobs} job(s), load average {os.getloadavg()}, {budget}", flush=True)
    # Mixture: widest runs first, so that the longest runs start first and the workers finish together (in width
    # order, the last d_model 128 run trained alone for 8 minutes). Per cell: cheapest cells first, so that a grid
    # stopped at its deadline holds whole rows of the table.
    if budget.protocol == "mixture":
        runs = [(m, w, cells) for w in sorted(args.widths, reverse=True) for m in args.mechanisms]
    else:
        runs = [(m, w, (cell,)) for cell in sorted(cells) for w in args.widths for m in args.mechanisms]
    results = []
    began, commit = time.perf_counter(), git_commit()  # the code that trains (HEAD may move during a long grid)

    def record(run_results):
        results.extend(run_results)
        _write(out, budget, results, began, args.jobs, commit)  # after every run: a stopped grid keeps its results
        for result in run_results:
            print(f"T={result['seq_len']:4d} D={result['num_pairs']:3d} d={result['width']:4d} "
                  f"{result['mechanism']:15s} accuracy {100 * result['accuracy']:5.1f}%  "
                  f"loss {result['final_loss']:.3f}  {result['steps']} steps  {result['seconds']:.0f} s  "
                  f"{result['cpu_seconds']:.0f} CPU s  load {result['load_average'][0]:.1f}-"
                  f"{result['load_average'][1]:.1f}", flush=True)

    if args.jobs > 1:
        import multiprocessing

        # Each worker is one XLA CPU thread: at these sizes, two single-threaded runs use two cores better than
        # one two-threaded run (the per-op work is too small to split). Spawned workers read the flag at start.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()
        context = multiprocessing.get_context("spawn")
        with context.Pool(args.jobs) as pool:
            for run_results in pool.imap_unordered(_run_worker, [(r, budget, args.verbose) for r in runs]):
                record(run_results)
    else:
        for run in runs:
            record(_run_worker((run, budget, args.verbose)))
    results.sort(key=lambda r: (r["seq_len"], r["width"], args.mechanisms.index(r["mechanism"])))
    _write(out, budget, results, began, args.jobs, commit)
    plot(results, args.widths, cells, args.mechanisms, out / "mqar.png")
    table = "\n\n".join(report.mqar({"budget": dataclasses.asdict(budget), "results": results}))  # as RESULTS.md
    print(f"\n{table}\n\nwall {time.perf_counter() - began:.0f} s; wrote {out / 'mqar.json'} and {out / 'mqar.png'}")


if __name__ == "__main__":
    main()
