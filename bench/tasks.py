"""Task-quality benchmarks. `mqar`: Zoology's multi-query associative recall over a grid of sequence lengths,
key-value pairs, model widths and attention mechanisms (Arora et al., 2023, arXiv 2312.04927, §3-4, Fig. 2).

    python -m bench.tasks mqar [--quick] [--mechanisms softmax based ...] [--widths 64 128] [--cells 64x4 128x8]

Model: the project's LLM with 2 layers, no MLP, one head for the exact mechanisms, re-initialised the way Zoology's
`_init_weights` does (`zoology_init`: normal(0, 0.02) matrices, output projections 0.02 / sqrt(2 L)), tied
embeddings (as Zoology). Departures from Zoology's Fig. 2 model: rotary positions instead of learned absolute ones,
RMSNorm instead of LayerNorm, no attention/embedding dropout (0.1 there), and the tied output projection is scaled
by 1/sqrt(d_model) (models/layers/embed.py). Per mechanism: sliding_window sees 16 keys; based projects queries and
keys to 16 features (the Based paper's feature dimension; Zoology's Fig. 2 config uses 8) in layer 2, after a
BaseConv layer (short convolution k = 3), as Zoology's Hybrid[BaseConv, Based]; performer uses 64 random features;
moh routes 2 of 3 heads around 1 shared head (4 heads); lightning uses ALiBi decay for one head (lambda = exp(-1/256)).
Training: AdamW (lr 3e-3, wd 0.1, 10% linear warmup then cosine to 0; Zoology: no warmup, cosine over 64 epochs,
lr swept over logspace(-4, -2, 4)), cross-entropy on the query positions only (Zoology's -100 labels); accuracy =
share of query positions whose argmax is the paired value, on held-out examples of another seed, checked every
`steps_per_call` steps (that many optimizer steps run as one compiled lax.scan); a cell stops once it reaches 99%,
as Zoology's early stopping does. Budget (CPU): vocabulary 512 (Zoology 8,192: with 20k examples each value token
is then seen too rarely to learn its embedding), 20k training examples (Zoology 100k), batch 64 (Zoology 512 / 256
/ 128 for T = 64 / 128 / 256), `--epochs` passes (default 5). See bench/RESULTS.md for measured results.
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
    "lightning": dict(attention_kwargs={"implementation": "reference"}),
    "performer": dict(attention_kwargs={"num_features": 64, "implementation": "reference"}),
    "moh": dict(num_heads=4, num_kv_heads=4, attention_kwargs={"n_shared": 1, "top_k": 2}),
}


@dataclasses.dataclass(frozen=True)
class Budget:
    """Per cell: at most `epochs` passes over `train_examples`, stopping early once held-out accuracy reaches
    `stop_accuracy` (Zoology stops at 0.99), checked every `steps_per_call` steps."""

    train_examples: int = 20_000
    test_examples: int = 1_000
    batch_size: int = 64
    epochs: int = 5
    learning_rate: float = 3e-3
    vocab_size: int = 512  # Zoology uses 8,192; must exceed the longest sequence
    steps_per_call: int = 250
    stop_accuracy: float = 0.99
    init: str = "zoology"  # "zoology": GPT-2 style normal(0.02) weights as Zoology's _init_weights; "model": ours
    warmup: float = 0.1  # share of the steps with a linear warmup before the cosine decay


def model_config(mechanism: str, width: int, vocab_size: int) -> LLMConfig:
    options = dict(MECHANISMS[mechanism])
    heads = options.pop("num_heads", 1)
    return LLMConfig(vocab_size=vocab_size, width=width, depth=2, num_heads=heads, num_kv_heads=options.pop(
        "num_kv_heads", heads), use_mlp=False, attention=mechanism, **options)


def zoology_init(model: LLM, key: jax.Array, depth: int = 2, std: float = 0.02) -> None:
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


def _query_rows(model, inputs, labels, num_pairs):
    """Logits [B, D, V] and labels [B, D] at the D query positions (the only scored ones)."""
    positions = jnp.argsort(labels == IGNORE, axis=1, stable=True)[:, :num_pairs]  # query positions first
    features = jnp.take_along_axis(model.features(inputs), positions[..., None], axis=1)
    return model.logits(features), jnp.take_along_axis(labels, positions, axis=1)


def run_cell(mechanism: str, width: int, seq_len: int, num_pairs: int, budget: Budget, seed: int = 0,
             verbose: bool = False) -> dict:
    train_x, train_y = (jnp.asarray(a) for a in mqar(budget.train_examples, seq_len, num_pairs, budget.vocab_size,
                                                      seed=seed))
    test_x, test_y = (jnp.asarray(a) for a in mqar(budget.test_examples, seq_len, num_pairs, budget.vocab_size,
                                                    seed=seed + 1))
    model = LLM(model_config(mechanism, width, budget.vocab_size), rngs=nnx.Rngs(seed))
    if budget.init == "zoology":
        zoology_init(model, jax.random.key(seed))
    steps_per_epoch = budget.train_examples // budget.batch_size
    steps = budget.epochs * steps_per_epoch
    schedule = optax.warmup_cosine_decay_schedule(0.0, budget.learning_rate, max(1, int(steps * budget.warmup)),
                                                  steps)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.1), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def loss_fn(model, x, y):
        logits, targets = _query_rows(model, x, y, num_pairs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    # Many optimizer steps per compiled call (a lax.scan over batch indices): at these model sizes a step costs
    # less than the Python dispatch of a single jitted step.
    @jax.jit
    def train_steps(state, train_x, train_y, batches):
        def step(state, batch):
            model, optimizer = nnx.merge(graphdef, state)
            loss, grads = nnx.value_and_grad(loss_fn)(model, train_x[batch], train_y[batch])
            optimizer.update(model, grads)
            return nnx.state((model, optimizer)), loss

        return jax.lax.scan(step, state, batches)

    @jax.jit
    def correct(state, x, y):
        model, _ = nnx.merge(graphdef, state)
        logits, targets = _query_rows(model, x, y, num_pairs)
        return jnp.sum(jnp.argmax(logits, -1) == targets)

    def accuracy(state):
        hits = sum(int(correct(state, test_x[i : i + 250], test_y[i : i + 250]))
                   for i in range(0, budget.test_examples, 250))
        return hits / (budget.test_examples * num_pairs)

    began = time.perf_counter()
    order = np.random.default_rng(seed)
    batches = np.concatenate([order.permutation(budget.train_examples)[: steps_per_epoch * budget.batch_size]
                              for _ in range(budget.epochs)]).reshape(steps, budget.batch_size)
    done, loss, score = 0, float("nan"), 0.0
    while done < steps:
        chunk = batches[done : done + budget.steps_per_call]
        state, losses = train_steps(state, train_x, train_y, jnp.asarray(chunk))
        done += len(chunk)
        loss, score = float(losses[-1]), accuracy(state)
        if verbose:
            print(f"  step {done:6d}  loss {loss:.3f}  accuracy {100 * score:5.1f}%  "
                  f"{time.perf_counter() - began:.0f} s", flush=True)
        if score >= budget.stop_accuracy or not np.isfinite(loss):  # a diverged run cannot recover
            break
    return {"mechanism": mechanism, "width": width, "seq_len": seq_len, "num_pairs": num_pairs,
            "accuracy": score, "final_loss": loss, "steps": done, "seconds": time.perf_counter() - began}


def table(results: list[dict], widths, cells, mechanisms) -> str:
    header = "| mechanism | width | " + " | ".join(f"T={t}, D={d}" for t, d in cells) + " |"
    lines = [header, "|" + "---|" * (len(cells) + 2)]
    index = {(r["mechanism"], r["width"], r["seq_len"], r["num_pairs"]): r for r in results}
    for mechanism in mechanisms:
        for width in widths:
            row = [f"{100 * index[(mechanism, width, t, d)]['accuracy']:.1f}%" if (mechanism, width, t, d) in index
                   else "—" for t, d in cells]
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tasks", description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=["mqar"])
    parser.add_argument("--mechanisms", nargs="+", default=list(MECHANISMS), choices=list(MECHANISMS))
    parser.add_argument("--widths", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--cells", nargs="+", default=[f"{t}x{d}" for t, d in CELLS],
                        help="sequence length x key-value pairs, e.g. 64x4 128x8")
    parser.add_argument("--quick", action="store_true", help="one small cell and budget: a smoke test")
    parser.add_argument("--epochs", type=int, default=Budget.epochs)
    parser.add_argument("--train-examples", type=int, default=Budget.train_examples)
    parser.add_argument("--learning-rate", type=float, default=Budget.learning_rate)
    parser.add_argument("--vocab-size", type=int, default=Budget.vocab_size)
    parser.add_argument("--batch-size", type=int, default=Budget.batch_size)
    parser.add_argument("--init", choices=["zoology", "model"], default=Budget.init,
                        help="zoology: Zoology's normal(0.02) weights (default); model: the LLM's own init")
    parser.add_argument("--verbose", action="store_true", help="print loss and accuracy every steps_per_call steps")
    parser.add_argument("--out", default="bench/out/mqar")
    args = parser.parse_args(argv)
    budget = Budget(train_examples=args.train_examples, epochs=args.epochs, learning_rate=args.learning_rate,
                    vocab_size=args.vocab_size, batch_size=args.batch_size, init=args.init)
    try:
        cells = tuple(tuple(int(part) for part in cell.split("x")) for cell in args.cells)
    except ValueError:
        parser.error(f"--cells: expected LENGTHxPAIRS items such as 64x4, got {args.cells}")
    if args.quick:
        budget = dataclasses.replace(budget, train_examples=512, test_examples=250, epochs=1, steps_per_call=4)
        cells = CELLS[:1]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"MQAR on {platform.processor() or platform.machine()} ({os.cpu_count()} cores), jax {jax.__version__}, "
          f"{budget}", flush=True)
    results = []
    began = time.perf_counter()
    for seq_len, num_pairs in cells:
        for width in args.widths:
            for mechanism in args.mechanisms:
                result = run_cell(mechanism, width, seq_len, num_pairs, budget, verbose=args.verbose)
                results.append(result)
                # Written after every cell, so that a run stopped early keeps what it measured.
                (out / "mqar.json").write_text(json.dumps({"budget": dataclasses.asdict(budget), "results": results,
                                                            "wall_seconds": time.perf_counter() - began}, indent=1))
                print(f"T={seq_len:4d} D={num_pairs:3d} d={width:4d} {mechanism:15s} "
                      f"accuracy {100 * result['accuracy']:5.1f}%  loss {result['final_loss']:.3f}  "
                      f"{result['steps']} steps  {result['seconds']:.0f} s", flush=True)
    (out / "mqar.json").write_text(json.dumps({"budget": dataclasses.asdict(budget), "results": results,
                                                "wall_seconds": time.perf_counter() - began}, indent=1))
    plot(results, args.widths, cells, args.mechanisms, out / "mqar.png")
    print(f"\n{table(results, args.widths, cells, args.mechanisms)}\n\nwall {time.perf_counter() - began:.0f} s; "
          f"wrote {out / 'mqar.json'} and {out / 'mqar.png'}")


if __name__ == "__main__":
    main()
