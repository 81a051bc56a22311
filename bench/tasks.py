"""Task-quality benchmarks. `mqar`: Zoology's multi-query associative recall over a grid of sequence lengths,
key-value pairs, model widths and attention mechanisms (Arora et al., 2023, arXiv 2312.04927, §3-4, Fig. 2).

    nice -n 5 python -m bench.tasks mqar --jobs 2 [--quick] [--mechanisms softmax based ...] [--widths 64 128]
        [--cells 64x4 128x8] [--steps 600] [--width-learning-rate 64=3e-3 128=1e-3] [--positions learned]
        [--warmup 0.1] [--untied] [--replot]

Model: the project's LLM with 2 layers, no MLP, one head for the exact mechanisms, re-initialised the way Zoology's
`_init_weights` does (`zoology_init`: normal(0, 0.02) matrices, output projections 0.02 / sqrt(2 L)), tied
embeddings (as Zoology); the final norm keeps its unit gain. (The tied output projection divides by sqrt(d_model)
here, models/layers/embed.py, so the initial logits are smaller than Zoology's; restoring Zoology's scale with a
final-norm gain of sqrt(d_model) was tried and kept softmax on the 1/D plateau: 25.9% after 1,600 steps at T = 64,
D = 4, d_model 64, against 97.6% with unit gain, bench/RESULTS.md.) Departures from Zoology's Fig. 2
model: rotary positions instead of learned absolute ones (`--positions learned` restores Zoology's: a normal(0.02)
[T, d] table added to the token embedding, rotary off; a probe, it did not lift d_model 128 off the plateau), RMSNorm instead of LayerNorm, no attention/embedding
dropout (0.1 there). Per mechanism: sliding_window sees 16 keys; based projects queries and keys to 16 features (the
Based paper's feature dimension; Zoology's Fig. 2 config uses 8) in layer 2, after a BaseConv layer (short
convolution k = 3), as Zoology's Hybrid[BaseConv, Based]; performer uses 64 random features; moh routes 2 of 3 heads
around 1 shared head (4 heads); lightning is TransNormerLLM's mixer (Lightning attention with its per-layer decay,
SRMSNorm and output gate; Zoology has no Lightning baseline, and the bare function, which has neither a normaliser
nor a norm, did not learn MQAR).
Training: AdamW (lr 3e-3 unless `--width-learning-rate`, wd 0.1, 10% linear warmup then cosine to 0 over `--steps`;
Zoology: no warmup, cosine over 64 epochs, lr swept over logspace(-4, -2, 4)), cross-entropy on the query positions
only (Zoology's -100 labels); accuracy = share of query positions whose argmax is the paired value, on held-out
examples of another seed, checked every `steps_per_call` steps (that many optimizer steps run as one compiled
lax.scan); a cell stops once it reaches 99%, as Zoology's early stopping does. Batch 64 at T = 64 and 64 * 64 / T
beyond (Zoology: 512 / 256 / 128 for T = 64 / 128 / 256, the same halving), test examples likewise (1,000 at T = 64).
Budget (CPU): vocabulary 512 (Zoology 8,192: with 20k examples each value token is then seen too rarely to learn its
embedding), 20k training examples (Zoology 100k), at most `--steps` steps. `--jobs N` runs cells in N worker
processes with single-threaded XLA (two single-threaded cells use two cores better than one two-threaded cell at
these sizes). Each cell records wall and CPU (process_time) seconds and the load average. See bench/RESULTS.md.
"""

import argparse
import dataclasses
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

from bench.scanned_training import scanned_train_steps, shuffled_batches
from models.llm import LLM, LLMConfig
from train.data.mqar import IGNORE, mqar

CELLS = ((64, 4), (128, 8), (256, 16))
MECHANISMS = {
    "softmax": dict(),
    "sliding_window": dict(attention_kwargs={"window": 16}),
    # The linear-attention mechanisms train through their quadratic view ("reference"; tested equal to the chunked
    # one): at T <= 256 it is several times faster on CPU, and Zoology trains Based the same way (train_view
    # "quadratic").
    # Zoology's Fig. 2 "based" model is Hybrid[BaseConv, Based]: layer 0 a gated short convolution (k = 3), layer 1
    # Taylor linear attention; the convolution is what moves a key next to its value.
    "based": dict(qk_head_dim=16, attention_kwargs={"implementation": "reference"},
                  layer_attention=(("base_conv", {"kernel_size": 3}), None)),
    # Lightning as its authors use it: TransNormerLLM's token mixer (the official `tnl_attn.py` module: SiLU q/k/v,
    # Lightning attention with the per-layer decay, SRMSNorm on the output, sigmoid output gate). Zoology has no
    # Lightning baseline; its linear attentions (zoology/mixers/based.py) normalise by the feature sum instead. The
    # bare `lightning` function has neither a normaliser nor a norm, and did not learn MQAR at all (1.6%).
    "lightning": dict(layer_attention=(("tnl", {"slopes": "tnl"}),)),
    "performer": dict(attention_kwargs={"num_features": 64, "implementation": "reference"}),
    "moh": dict(num_heads=4, num_kv_heads=4, attention_kwargs={"n_shared": 1, "top_k": 2}),
}


@dataclasses.dataclass(frozen=True)
class Budget:
    """Per cell: at most `steps` optimizer steps drawn from `train_examples` (reshuffled every pass), stopping early
    once held-out accuracy reaches `stop_accuracy` (Zoology stops at 0.99), checked every `steps_per_call` steps.
    `batch_size` is the batch at T = 64; longer sequences use batch_size * 64 / T, as Zoology's 512 / 256 / 128,
    so every step sees the same number of tokens and of queried pairs."""

    train_examples: int = 20_000
    test_examples: int = 1_000
    batch_size: int = 64
    steps: int = 600
    learning_rate: float = 3e-3
    width_learning_rates: tuple = ()  # ((d_model, lr), ...): overrides learning_rate for those widths
    vocab_size: int = 512  # Zoology uses 8,192; must exceed the longest sequence
    steps_per_call: int = 100
    stop_accuracy: float = 0.99
    init: str = "zoology"  # "zoology": GPT-2 style normal(0.02) weights as Zoology's _init_weights; "model": ours
    final_norm_gain: str = "one"  # "sqrt": gain sqrt(d_model), Zoology's initial logit scale (see zoology_init)
    warmup: float = 0.1  # share of the steps with a linear warmup before the cosine decay
    tie_embeddings: bool = True  # False: a separate output matrix, logits x W without the tied 1/sqrt(d) (a probe)
    positions: str = "rope"  # "learned": Zoology's learned absolute positions (normal(0.02)) and no rotary


def model_config(mechanism: str, width: int, vocab_size: int, tie_embeddings: bool = True) -> LLMConfig:
    options = dict(MECHANISMS[mechanism])
    heads = options.pop("num_heads", 1)
    return LLMConfig(vocab_size=vocab_size, width=width, depth=2, num_heads=heads, num_kv_heads=options.pop(
        "num_kv_heads", heads), use_mlp=False, attention=mechanism, tie_embeddings=tie_embeddings, **options)


def zoology_init(model: LLM, key: jax.Array, depth: int = 2, std: float = 0.02, final_norm_gain: str = "one") -> None:
    """Re-draws the model's weights as Zoology's `_init_weights` does (zoology/model.py): every matrix (embedding,
    projections, routers; not BaseConv's convolution, a torch Conv1d there) from normal(0, 0.02), the attention
    output projections from normal(0, 0.02 / sqrt(2 * n_layers)); norm scales and biases stay as they are.
    Why: the LLM's own init (unit-variance embeddings, fan-in projections) makes each AdamW step a much smaller
    *relative* change of the weights (lr / std: 6x smaller for d_model 64 projections, 50x for the embedding), which
    is what made MQAR learn ~10x slower here than in Zoology (bench/RESULTS.md)."""
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    fresh = []
    for (path, leaf), leaf_key in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        if leaf.ndim < 2 or "conv_kd" in name or "filter" in name:  # norms, biases; Conv1d keeps torch's init
            fresh.append(leaf)
            continue
        scale = std / (2 * depth) ** 0.5 if "out_nhd" in name else std
        fresh.append(scale * jax.random.normal(leaf_key, leaf.shape, leaf.dtype))
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, fresh))
    # The final norm keeps its unit gain by default although our tied output divides by sqrt(d_model) and Zoology's
    # does not: a gain of sqrt(d_model) (final_norm_gain="sqrt", Zoology's initial logit scale) held softmax on the
    # 1/D plateau (module docstring) but helped based (the 600-step grid of bench/RESULTS.md ran with it).
    if final_norm_gain == "sqrt":
        width = model.final_norm.scale_d.shape[0]
        model.final_norm.scale_d[...] = jnp.full((width,), width**0.5, model.final_norm.scale_d.dtype)


class LearnedPositions(nnx.Module):
    """The token embedding plus a learned absolute position table [T, D], as Zoology's TokenEmbeddings
    (zoology/model.py, max_position_embeddings > 0); `attend` is the token table's (tied output)."""

    def __init__(self, embed: nnx.Module, seq_len: int, width: int, key: jax.Array, std: float = 0.02):
        self.inner = embed
        self.position_td = nnx.Param(std * jax.random.normal(key, (seq_len, width), embed.embedding_vd.dtype))

    @property
    def embedding_vd(self):
        return self.inner.embedding_vd

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        return self.inner(token_ids) + self.position_td[: token_ids.shape[-1]]

    def attend(self, x: jax.Array) -> jax.Array:
        return self.inner.attend(x)


def use_learned_positions(model: LLM, seq_len: int, key: jax.Array) -> None:
    """Zoology's positional scheme: learned absolute positions added to the token embedding, rotary turned off in
    every attention layer that has it (Zoology's MHA mixer has no rotary)."""
    if not all(hasattr(block.attention, "use_rope") for block in model.blocks):
        raise ValueError("positions='learned' needs attention layers with a `use_rope` switch (softmax-like ones)")
    for block in model.blocks:
        block.attention.use_rope = False
    model.embed = LearnedPositions(model.embed, seq_len, model.embed.embedding_vd.shape[1], key)


def _query_rows(model, inputs, labels, num_pairs):
    """Logits [B, D, V] and labels [B, D] at the D query positions (the only scored ones)."""
    positions = jnp.argsort(labels == IGNORE, axis=1, stable=True)[:, :num_pairs]  # query positions first
    features = jnp.take_along_axis(model.features(inputs), positions[..., None], axis=1)
    return model.logits(features), jnp.take_along_axis(labels, positions, axis=1)


def run_cell(mechanism: str, width: int, seq_len: int, num_pairs: int, budget: Budget, seed: int = 0,
             verbose: bool = False) -> dict:
    train_x, train_y = (jnp.asarray(a) for a in mqar(budget.train_examples, seq_len, num_pairs, budget.vocab_size,
                                                      seed=seed))
    # Test examples scale as the batch (1,000 at T = 64): every cell scores the same 4,000 query positions, and a
    # check costs the same forward tokens.
    test_examples = max(1, budget.test_examples * 64 // seq_len)
    test_x, test_y = (jnp.asarray(a) for a in mqar(test_examples, seq_len, num_pairs, budget.vocab_size,
                                                    seed=seed + 1))
    model = LLM(model_config(mechanism, width, budget.vocab_size, budget.tie_embeddings), rngs=nnx.Rngs(seed))
    if budget.init == "zoology":
        zoology_init(model, jax.random.key(seed), final_norm_gain=budget.final_norm_gain)
    if budget.positions == "learned":
        use_learned_positions(model, seq_len, jax.random.key(seed + 7))
    steps = budget.steps
    batch_size = max(1, budget.batch_size * 64 // seq_len)
    learning_rate = dict(budget.width_learning_rates).get(width, budget.learning_rate)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, int(steps * budget.warmup)), steps)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.1), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def loss_fn(model, x, y):
        logits, targets = _query_rows(model, x, y, num_pairs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    train_steps = scanned_train_steps(graphdef, loss_fn)

    @jax.jit
    def correct(state, x, y):
        model, _ = nnx.merge(graphdef, state)
        logits, targets = _query_rows(model, x, y, num_pairs)
        return jnp.sum(jnp.argmax(logits, -1) == targets)

    def accuracy(state):
        hits = sum(int(correct(state, test_x[i : i + 250], test_y[i : i + 250])) for i in range(0, test_examples, 250))
        return hits / (test_examples * num_pairs)

    began, cpu_began, load_began = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    batches = shuffled_batches(budget.train_examples, steps, batch_size, seed)
    done, loss, score = 0, float("nan"), 0.0
    while done < steps:
        chunk = batches[done : done + budget.steps_per_call]
        state, losses = train_steps(state, train_x, train_y, jnp.asarray(chunk))
        done += len(chunk)
        loss, score = float(losses[-1]), accuracy(state)
        if verbose:
            print(f"  step {done:6d}  loss {loss:.3f}  accuracy {100 * score:5.1f}%  "
                  f"{time.perf_counter() - began:.0f} s, {time.process_time() - cpu_began:.0f} CPU s", flush=True)
        if score >= budget.stop_accuracy or not np.isfinite(loss):  # a diverged run cannot recover
            break
    return {"mechanism": mechanism, "width": width, "seq_len": seq_len, "num_pairs": num_pairs,
            "learning_rate": learning_rate, "batch_size": batch_size, "accuracy": score, "final_loss": loss,
            "steps": done, "seconds": time.perf_counter() - began, "cpu_seconds": time.process_time() - cpu_began,
            "load_average": [load_began, os.getloadavg()[0]]}


def _entry(result: dict | None) -> str:
    if result is None:
        return "—"
    return (f"{100 * result['accuracy']:.1f}% ({result['seconds']:.0f} s / {result['cpu_seconds']:.0f} CPU s"
            f"{'' if result['accuracy'] < 0.99 else ', ' + str(result['steps']) + ' steps'})")


def table(results: list[dict], widths, cells, mechanisms) -> str:
    header = "| mechanism | d_model | " + " | ".join(f"T={t}, D={d}: accuracy (wall / CPU)" for t, d in cells) + " |"
    lines = [header, "|" + "---|" * (len(cells) + 2)]
    index = {(r["mechanism"], r["width"], r["seq_len"], r["num_pairs"]): r for r in results}
    for mechanism in mechanisms:
        for width in widths:
            row = [_entry(index.get((mechanism, width, t, d))) for t, d in cells]
            lines.append(f"| {mechanism} | {width} | " + " | ".join(row) + " |")
    return "\n".join(lines)


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
    axes[0][-1].legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _cell_worker(job):
    """One cell in a worker process (module level, so that a spawned process can import it)."""
    (mechanism, width, seq_len, num_pairs), budget, verbose = job
    try:
        return run_cell(mechanism, width, seq_len, num_pairs, budget, verbose=verbose)
    except Exception as error:  # one broken cell is reported in the table, not the end of the grid
        return {"mechanism": mechanism, "width": width, "seq_len": seq_len, "num_pairs": num_pairs,
                "error": f"{type(error).__name__}: {error}", "accuracy": float("nan"), "final_loss": float("nan"),
                "steps": 0, "seconds": 0.0, "cpu_seconds": 0.0, "load_average": list(os.getloadavg()[:1]) * 2}


def _write(out: pathlib.Path, budget: Budget, results: list[dict], began: float, jobs: int) -> None:
    (out / "mqar.json").write_text(json.dumps({
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
    parser.add_argument("--steps", type=int, default=Budget.steps, help="most optimizer steps per cell")
    parser.add_argument("--train-examples", type=int, default=Budget.train_examples)
    parser.add_argument("--learning-rate", type=float, default=Budget.learning_rate)
    parser.add_argument("--width-learning-rate", nargs="+", default=[], metavar="WIDTH=LR",
                        help="per-width learning rates, e.g. 64=3e-3 128=1e-3 (others use --learning-rate)")
    parser.add_argument("--vocab-size", type=int, default=Budget.vocab_size)
    parser.add_argument("--batch-size", type=int, default=Budget.batch_size, help="batch at T = 64 (scaled by 64/T)")
    parser.add_argument("--init", choices=["zoology", "model"], default=Budget.init,
                        help="zoology: Zoology's normal(0.02) weights (default); model: the LLM's own init")
    parser.add_argument("--final-norm-gain", choices=["one", "sqrt"], default=Budget.final_norm_gain,
                        help="with --init zoology: the final norm's gain, 1 (default) or sqrt(d_model) (Zoology's "
                             "initial logit scale under our tied 1/sqrt(d) output)")
    parser.add_argument("--positions", choices=["rope", "learned"], default=Budget.positions,
                        help="rope: rotary (the LLM's); learned: Zoology's learned absolute positions, no rotary")
    parser.add_argument("--untied", action="store_true",
                        help="a separate output matrix (Zoology ties; ours divides the tied output by sqrt(d_model))")
    parser.add_argument("--warmup", type=float, default=Budget.warmup, help="share of steps with linear warmup")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cells run in this many worker processes, each with single-threaded XLA")
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
        print(table(results, widths, cells, mechanisms))
        return
    try:
        width_lrs = tuple((int(w), float(lr)) for w, lr in (item.split("=") for item in args.width_learning_rate))
        cells = tuple(tuple(int(part) for part in cell.split("x")) for cell in args.cells)
    except ValueError:
        parser.error(f"--cells: expected LENGTHxPAIRS items such as 64x4, got {args.cells}; --width-learning-rate: "
                     f"expected WIDTH=LR items, got {args.width_learning_rate}")
    budget = Budget(train_examples=args.train_examples, steps=args.steps, learning_rate=args.learning_rate,
                    width_learning_rates=width_lrs, vocab_size=args.vocab_size, batch_size=args.batch_size,
                    init=args.init, final_norm_gain=args.final_norm_gain, positions=args.positions,
                    warmup=args.warmup, tie_embeddings=not args.untied)
    if args.quick:
        budget = dataclasses.replace(budget, train_examples=512, test_examples=250, steps=8, steps_per_call=4)
        cells = CELLS[:1]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"MQAR on {platform.processor() or platform.machine()} ({os.cpu_count()} cores), jax {jax.__version__}, "
          f"{args.jobs} job(s), load average {os.getloadavg()}, {budget}", flush=True)
    # Cheapest cells first: a run stopped at its deadline then holds whole rows of the table.
    grid = sorted(((m, w, t, d) for t, d in cells for w in args.widths for m in args.mechanisms),
                  key=lambda c: (c[2], c[1], args.mechanisms.index(c[0])))
    results = []
    began = time.perf_counter()

    def record(result):
        results.append(result)
        _write(out, budget, results, began, args.jobs)  # after every cell: a stopped run keeps what it measured
        print(f"T={result['seq_len']:4d} D={result['num_pairs']:3d} d={result['width']:4d} "
              f"{result['mechanism']:15s} accuracy {100 * result['accuracy']:5.1f}%  loss {result['final_loss']:.3f}"
              f"  {result['steps']} steps  {result['seconds']:.0f} s  {result['cpu_seconds']:.0f} CPU s  "
              f"load {result['load_average'][0]:.1f}-{result['load_average'][1]:.1f}", flush=True)

    if args.jobs > 1:
        import multiprocessing

        # Each worker is one XLA CPU thread: at these sizes, two single-threaded cells use two cores better than
        # one two-threaded cell (the per-op work is too small to split). Spawned workers read the flag at start.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()
        context = multiprocessing.get_context("spawn")
        with context.Pool(args.jobs) as pool:
            for result in pool.imap_unordered(_cell_worker, [(c, budget, args.verbose) for c in grid]):
                record(result)
    else:
        for cell in grid:
            record(_cell_worker((cell, budget, args.verbose)))
    results.sort(key=lambda r: (r["seq_len"], r["width"], args.mechanisms.index(r["mechanism"])))
    _write(out, budget, results, began, args.jobs)
    plot(results, args.widths, cells, args.mechanisms, out / "mqar.png")
    print(f"\n{table(results, args.widths, cells, args.mechanisms)}\n\nwall {time.perf_counter() - began:.0f} s; "
          f"wrote {out / 'mqar.json'} and {out / 'mqar.png'}")


if __name__ == "__main__":
    main()
