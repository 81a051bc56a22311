"""Digits classification at patch size 1 for softmax and every vision mechanism (issue 6 experiment).

Each 8x8 digit becomes an 8x8 grid of 64 tokens, so locality matters: neighbourhood, halo, window and pooled
mechanisms see a real 2-D layout. Every mechanism trains the same ViT (configs/experiments/vit_digits.gin at
PATCH_SIZE 1, mean pooling, so no class token sits outside the grid; width 32, depth 2, batch 32, see SIZE) with its own overlay
(configs/attention/<name>.gin, those whose header says `# Base: experiments/vit_digits.gin`), for the same number of
steps, one after the other in this process. Prints a table (test accuracy, shift-averaged accuracy, wall time,
seconds per step after compilation) and writes JSON and a bar chart.

    python -m bench.vision_digits                       # every vision overlay + softmax
    python -m bench.vision_digits --mechanisms softmax neighborhood --steps 200
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
EXPERIMENT = "experiments/vit_digits.gin"


# A smaller model than vit_digits.gin's (width 64, depth 4, batch 64): at patch 1 every step attends over 64 tokens,
# and a 2-core CPU must train every mechanism in about two minutes. Override with --binding.
SIZE = ["WIDTH = 32", "DEPTH = 2", "NUM_HEADS = 2", "MLP_WIDTH = 64", "BATCH_SIZE = 32"]


def vision_overlays() -> dict[str, pathlib.Path]:
    """{mechanism: overlay file} for the overlays that replace the digits ViT's attention. Overlays that add a
    branch beside it (`# Adds:`: DCAL's GLCA, the conditional cross-attention head) need a class token or a loss of
    their own and have their own experiments (configs/experiments/dcal_digits.gin, conditional_digits.gin)."""
    found = {}
    for path in sorted((CONFIGS / "attention").glob("*.gin")):
        text = path.read_text()
        base = re.search(r"^#\s*Base:\s*(\S+)", text, flags=re.MULTILINE)
        adds = re.search(r"^#\s*Adds:", text, flags=re.MULTILINE)
        if base and base.group(1) == EXPERIMENT and not adds:
            found[path.stem] = path
    return found


def run_one(name: str, overlay: pathlib.Path | None, steps: int, bindings: list[str], workdir: str) -> dict:
    from train import gin_config, trainer

    files = [str(CONFIGS / EXPERIMENT)] + ([str(overlay)] if overlay else [])
    warmup = max(1, steps // 30)
    gin_config.parse(files, ["PATCH_SIZE = 1", "POOLING = 'mean'", f"STEPS = {steps}", *SIZE,
                             f"WARMUP_STEPS = {warmup}", f"trainer.train.eval_every = {steps}",
                             f"trainer.train.checkpoint_every = {steps}", *bindings])
    run = gin_config.configured(trainer.train)
    began = time.perf_counter()
    result = run(workdir=workdir)
    wall = time.perf_counter() - began
    final = result.evaluations[max(result.evaluations)]
    records = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    rates = [record["tokens_per_second"] for record in records if "tokens_per_second" in record]
    return {"mechanism": name, "steps": steps, "wall_s": wall,
            # the trainer's smoothed tokens/s at the last log, after compilation; 64 tokens per image at patch 1
            "images_per_second": rates[-1] / 64 if rates else None,
            "test_accuracy": final["test_accuracy"],
            "test_accuracy_shift_averaged": final.get("test_accuracy_shift_averaged"),
            "test_loss": final["test_loss"], "final_train_loss": result.losses[max(result.losses)]}


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.45 * len(rows) + 1.5))
    names = [row["mechanism"] for row in rows]
    left.barh(names, [100 * row["test_accuracy"] for row in rows], color="tab:blue")
    left.set_xlabel("test accuracy (%)")
    left.set_xlim(min(80, min(100 * row["test_accuracy"] for row in rows) - 2), 100)
    right.barh(names, [row["wall_s"] for row in rows], color="tab:orange")
    right.set_xlabel("wall time (s, compile included)")
    for axis in (left, right):
        axis.invert_yaxis()
    fig.suptitle(f"digits ViT, patch 1 (8x8 grid), {rows[0]['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mechanisms", nargs="+", default=None,
                        help="default: softmax and every overlay built on the digits ViT")
    parser.add_argument("--steps", type=int, default=840, help="training steps per mechanism (840 = 20 epochs)")
    parser.add_argument("--binding", action="append", default=[], help="extra gin binding for every run")
    parser.add_argument("--out", default="bench/out/vision_digits.json")
    parser.add_argument("--plot", default="bench/out/vision_digits.png")
    args = parser.parse_args(argv)
    overlays = vision_overlays()
    names = args.mechanisms or ["softmax", *overlays]
    unknown = [name for name in names if name != "softmax" and name not in overlays]
    if unknown:
        parser.error(f"no digits-ViT overlay for {unknown}; available: {['softmax', *overlays]}")
    rows = []
    for name in names:
        with tempfile.TemporaryDirectory() as workdir:
            print(f"== {name}", flush=True)
            rows.append(run_one(name, overlays.get(name), args.steps, args.binding, workdir))
        print(json.dumps(rows[-1]), flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    plot(rows, pathlib.Path(args.plot))
    print("\n| mechanism | test acc. | shift-avg. acc. | train images/s | wall (s) |\n|---|---|---|---|---|")
    for row in rows:
        averaged, rate = row["test_accuracy_shift_averaged"], row["images_per_second"]
        print(f"| {row['mechanism']} | {100 * row['test_accuracy']:.1f}% | "
              f"{'-' if averaged is None else f'{100 * averaged:.1f}%'} | {'-' if rate is None else f'{rate:.0f}'} | "
              f"{row['wall_s']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
