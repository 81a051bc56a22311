"""Looking inside a trained model: `python -m train.analyze maps|heads|retrieval --workdir W --out DIR [--step N]`.

Restores the newest (or the chosen) checkpoint of a `python -m train` workdir the way `train.export` does (its
`rebuild`, `checkpoint_params`), then writes to DIR:

    maps       maps.png: every plain-softmax layer's attention map, one panel per (layer, head), for one input (a
               validation window for the LLM, a training image for the ViT, a seeded noisy input for the DiT);
               maps.json: layer names, shapes, each head's mean row entropy (nats); for a ViT also rollout.png,
               the class token's attention rollout over the patch grid (Abnar & Zuidema 2020, attnx.analysis).
    heads      heads.png + heads.json: the training loss on one fixed batch (fixed rng) with each head zeroed before
               the output projection (`models.layers.attention.set_head_masks`), minus the intact loss, as an
               [L, N] heat map and a ranked table (circuit-style head ablation).
    retrieval  LLM only. retrieval.png + retrieval.json: retrieval-head scores (Wu et al., 2024, arXiv 2404.15574 §2;
               spec llm_mechanisms.md §9) on synthetic needle-in-a-haystack prompts: `--trials` prompts of `--length`
               bytes of validation text with the needle "#k=DDDD;" at evenly spaced depths, ending in the question
               "#k="; the model decodes the 4 digits greedily and each head scores 1/4 per step at which the argmax
               of its last attention row is the needle digit it just emitted. The JSON keeps every trial's answer and
               ROUGE-1-style digit recall; the spec counts only trials with recall > 0.5, a tiny model seldom
               answers, so both the mean over all trials and over counted trials are written.

Only plain 'softmax' layers of the shared attention layer have one softmax map to show (maps, retrieval); head
masks need the shared layer (all three families' default). Exit status 2 on a usage error (missing workdir,
checkpoint or config, a family that does not support the mode, no softmax layer).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from train import export, gin_config

MODES = ("maps", "heads", "retrieval")
NEEDLE_KEY = b"#k="


class AnalyzeError(ValueError):
    """A usage error: missing workdir/checkpoint/config, or a mode the trained family does not support."""


def load(workdir: str | pathlib.Path, step: int | None = None):
    """(task, model in evaluation mode, step) of a workdir; reuses train.export's loader."""
    workdir = pathlib.Path(workdir).absolute()
    if not workdir.is_dir():
        raise AnalyzeError(f"--workdir {workdir} does not exist")
    try:
        rebuilt = export.rebuild(workdir / gin_config.RESOLVED_CONFIG_FILE)
        params, step = export.checkpoint_params(workdir, step)
        return rebuilt.task, rebuilt.merge(params), step
    except export.ExportError as error:
        raise AnalyzeError(str(error)) from None


def family(task: Any) -> str:
    from train.image_classification import ImageClassification
    from train.image_diffusion import ClassConditionalDiffusion
    from train.language_model import ByteLanguageModel

    if type(task) is ByteLanguageModel:
        if task.landmark_block_size is not None:
            raise AnalyzeError("a byte LM with landmark attention lays its inputs out with landmark tokens; analyze "
                               "supports the plain byte LM")
        return "llm"
    if type(task) is ImageClassification:
        return "vit"
    if type(task) is ClassConditionalDiffusion:
        return "dit"
    raise AnalyzeError(f"cannot analyze a {type(task).__module__}.{type(task).__name__} task: supported are "
                       "language_model.ByteLanguageModel, image_classification.ImageClassification and "
                       "image_diffusion.ClassConditionalDiffusion")


def _first_batch(task) -> dict[str, np.ndarray]:
    return {name: np.asarray(value) for name, value in next(iter(task.train_iterator(0, 1))).items()}


def probe_inputs(task, kind: str, seed: int = 0) -> tuple[np.ndarray, ...]:
    """One input for `maps`: a validation window (LLM), a training image (ViT), a seeded sample (DiT)."""
    if kind == "llm":
        text = np.frombuffer(task.data.validation_text, np.uint8)
        return (text[None, :task.data.seq_len].astype(np.int32),)
    if kind == "vit":
        return (_first_batch(task)["image"][:1].astype(np.float32),)
    return export.signature_for(task).sample(np.random.default_rng(seed), 1)


def _captured(model, *inputs) -> dict[str, np.ndarray]:
    from flax import nnx

    from models.layers.attention import capture_attention_probabilities

    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, *xs: capture_attention_probabilities(nnx.merge(graphdef, state), *xs)[1])
    maps = {name: np.asarray(value) for name, value in run(state, *inputs).items()}
    if not maps:
        raise AnalyzeError("the model has no plain 'softmax' attention layer, so there is no softmax map to show "
                           "(other mechanisms form no single map)")
    return maps


def _heat_grid(panels: list[list[np.ndarray]], row_labels: list[str], title: str, path: pathlib.Path,
               panel_titles: list[list[str]] | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(panels), max(len(row) for row in panels)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols + 0.5, 2.2 * rows + 0.6), squeeze=False)
    for r, row in enumerate(panels):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            if c < len(row):
                ax.imshow(row[c], cmap="viridis", interpolation="nearest")
                label = panel_titles[r][c] if panel_titles else f"{row_labels[r]} head {c}"
                ax.set_title(label, fontsize=7)
            else:
                ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_maps(task, model, kind: str, out: pathlib.Path, seed: int = 0) -> dict[str, Any]:
    from attnx.analysis import attention_rollout, rollout_to_grid

    inputs = probe_inputs(task, kind, seed)
    maps = _captured(model, *inputs)
    names = list(maps)
    panels = [[maps[name][0, h] for h in range(maps[name].shape[1])] for name in names]
    _heat_grid(panels, [n.replace(".attention", "") for n in names], f"attention maps ({kind}, one input)",
               out / "maps.png")
    entropy = {name: (-np.sum(np.where(m > 0, m * np.log(np.where(m > 0, m, 1.0)), 0.0), axis=-1)).mean(axis=(0, 2))
               .tolist() for name, m in maps.items()}
    record = {"family": kind, "layers": names, "shapes": {n: list(m.shape) for n, m in maps.items()},
              "mean_row_entropy_nats": entropy, "files": ["maps.png"]}
    plain_vit = hasattr(model, "stages") and hasattr(model, "cls_token_d")  # models.vit.ViT (not DCAL's wrapper)
    if kind == "vit" and plain_vit and len({m.shape for m in maps.values()}) == 1:
        rollout = np.asarray(attention_rollout([m for m in maps.values()]))  # [B, T, T]
        num_prefix = 0 if model.cls_token_d is None else 1
        grid = tuple(model.stages[-1].grid)
        image = np.asarray(rollout_to_grid(rollout, grid, num_prefix=num_prefix))[0]
        _heat_grid([[inputs[0][0, ..., 0], image]], [""], "attention rollout (class token)", out / "rollout.png",
                   panel_titles=[["input (channel 0)", "rollout over the patches"]])
        record["rollout"] = image.tolist()
        record["files"].append("rollout.png")
    return record


def run_heads(task, model, kind: str, out: pathlib.Path, seed: int = 0) -> dict[str, Any]:
    from flax import nnx

    from attnx.analysis import ablation_deltas, rank_heads
    from models.layers.attention import attention_layers, set_head_masks

    layers = attention_layers(model)
    if not layers:
        raise AnalyzeError("the model has no shared attention layer whose heads can be masked")
    num_heads = {layer.out_nhd.shape[0] for _, layer in layers}
    if len(num_heads) != 1:
        raise AnalyzeError(f"head ablation expects one head count across layers, got {sorted(num_heads)}")
    (heads,) = num_heads
    batch = {name: jnp.asarray(value) for name, value in _first_batch(task).items()}
    rng = jax.random.key(seed)
    graphdef, state = nnx.split(model)

    @jax.jit
    def loss(state, masks):
        ablated = nnx.merge(graphdef, state)
        set_head_masks(ablated, masks)
        return task.loss_fn(ablated, batch, rng)[0]

    ones = np.ones((len(layers), heads), np.float32)
    base = float(loss(state, ones))
    ablated = np.zeros_like(ones)
    for l in range(len(layers)):
        for h in range(heads):
            masks = ones.copy()
            masks[l, h] = 0.0
            ablated[l, h] = float(loss(state, masks))
    deltas = ablation_deltas(base, ablated)
    names = [name for name, _ in layers]
    record = {"family": kind, "layers": names, "base_loss": base, "ablated_loss": ablated.tolist(),
              "delta": deltas.tolist(), "ranking": rank_heads(deltas, layer_names=names), "files": ["heads.png"]}
    _matrix_png(deltas, names, "loss change when the head is zeroed", out / "heads.png")
    return record


def _matrix_png(matrix: np.ndarray, names: list[str], title: str, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * matrix.shape[1], 1.0 + 0.4 * matrix.shape[0]))
    image = ax.imshow(matrix, cmap="coolwarm" if matrix.min() < 0 else "viridis", aspect="auto")
    ax.set_xticks(range(matrix.shape[1])), ax.set_xlabel("head")
    ax.set_yticks(range(len(names)), [n.replace(".attention", "") for n in names], fontsize=7)
    fig.colorbar(image, ax=ax)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def needle_prompt(haystack: np.ndarray, length: int, depth: float, digits: bytes) -> tuple[np.ndarray, tuple]:
    """(prompt [length] int32, needle digit span) : haystack bytes with NEEDLE_KEY+digits+";" at `depth` in [0, 1]
    of the haystack part, ending in the question NEEDLE_KEY."""
    needle = NEEDLE_KEY + digits + b";"
    hay_len = length - len(needle) - len(NEEDLE_KEY)
    if hay_len < 1 or len(haystack) < hay_len:
        raise AnalyzeError(f"--length {length}: a needle prompt needs more than {len(needle) + len(NEEDLE_KEY)} "
                           f"bytes and at most {len(needle) + len(NEEDLE_KEY) + len(haystack)} (the validation text)")
    at = int(round(depth * hay_len))
    hay = bytes(haystack[:hay_len])
    prompt = hay[:at] + needle + hay[at:] + NEEDLE_KEY
    start = at + len(NEEDLE_KEY)
    return np.frombuffer(prompt, np.uint8).astype(np.int32), (start, start + len(digits))


def run_retrieval(task, model, kind: str, out: pathlib.Path, seed: int = 0, trials: int = 4,
                  length: int | None = None) -> dict[str, Any]:
    from flax import nnx

    from attnx.analysis import rank_heads, retrieval_heads, retrieval_score_step
    from models.layers.attention import attention_layers, capture_attention_probabilities

    if kind != "llm":
        raise AnalyzeError(f"mode 'retrieval' needs a language model (needle-in-a-haystack decoding); this workdir "
                           f"trained a {kind}")
    if trials < 1:
        raise AnalyzeError(f"--trials {trials}: expected at least 1")
    length = task.data.seq_len if length is None else length
    haystack = np.frombuffer(task.data.validation_text, np.uint8)
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens):
        logits, maps = capture_attention_probabilities(nnx.merge(graphdef, state), tokens)
        return logits, jnp.stack([m[0] for m in maps.values()]) if maps else jnp.zeros((0,))

    digits_len, results, scores = 4, [], []
    for trial in range(trials):
        digits = bytes(rng.choice(list(b"0123456789"), digits_len).tolist())
        depth = trial / max(trials - 1, 1)
        prompt, span = needle_prompt(haystack, length, depth, digits)
        buffer = np.zeros((1, len(prompt) + digits_len), np.int32)  # causal: positions after the query are unread
        buffer[0, :len(prompt)] = prompt
        total, answer = np.zeros(0), []
        for i in range(digits_len):
            position = len(prompt) + i - 1  # the query that produces the next token
            logits, maps = forward(state, jnp.asarray(buffer))
            if maps.ndim != 4:
                raise AnalyzeError("the model has no plain 'softmax' attention layer, so retrieval scores (argmax of "
                                   "attention rows) cannot be read")
            token = int(jnp.argmax(logits[0, position]))
            step = np.asarray(retrieval_score_step(maps[:, :, position, :], span, prompt, token))
            total = step if total.size == 0 else total + step
            buffer[0, position + 1] = token
            answer.append(token)
        recall = float(np.mean([d in answer for d in digits]))
        scores.append(total)
        results.append({"depth": depth, "needle": digits.decode(), "span": list(span),
                        "answer": bytes(answer).decode("latin-1"), "recall": recall, "counted": recall > 0.5,
                        "scores": total.tolist()})
    names = [name for name, layer in attention_layers(model) if layer.has_softmax_map()]  # the capture's order
    mean = np.mean(scores, axis=0)
    counted = [r["scores"] for r in results if r["counted"]]
    record = {"family": kind, "layers": names, "length": length, "trials": results, "mean_score": mean.tolist(),
              "mean_score_counted": np.mean(counted, axis=0).tolist() if counted else None,
              "ranking": rank_heads(mean, layer_names=names), "retrieval_heads_above_0.1": retrieval_heads(mean),
              "files": ["retrieval.png"]}
    _matrix_png(mean, names, f"retrieval score (mean of {trials} needle trials)", out / "retrieval.png")
    return record


def analyze(mode: str, workdir, out, *, step: int | None = None, seed: int = 0, trials: int = 4,
            length: int | None = None) -> dict[str, Any]:
    if mode not in MODES:
        raise AnalyzeError(f"mode {mode!r}; allowed: {', '.join(MODES)}")
    task, model, step = load(workdir, step)
    kind = family(task)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if mode == "maps":
        record = run_maps(task, model, kind, out, seed)
    elif mode == "heads":
        record = run_heads(task, model, kind, out, seed)
    else:
        record = run_retrieval(task, model, kind, out, seed, trials, length)
    record["step"] = step
    (out / f"{mode}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--workdir", required=True, help="the `python -m train` workdir (config.gin, checkpoints/)")
    parser.add_argument("--out", required=True, help="directory to write the PNG and JSON files to")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trials", type=int, default=4, help="retrieval: needle prompts (depths evenly spaced)")
    parser.add_argument("--length", type=int, help="retrieval: prompt bytes (default: the training seq_len)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        record = analyze(args.mode, args.workdir, args.out, step=args.step, seed=args.seed, trials=args.trials,
                         length=args.length)
    except (AnalyzeError, gin_config.GinConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.mode}: wrote {', '.join(record['files'])} (and JSON) for step {record['step']} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
