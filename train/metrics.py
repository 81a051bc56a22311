"""Run metrics: a JSONL log and TensorBoard event files in the workdir, and a loss plot at the end.

Each JSONL line is one record `{"step": s, "kind": "train"|"eval", <name>: <float>, ...}`; a resumed run appends
to the same file, so the log covers the whole run.
"""

import json
import math
import pathlib
from typing import Mapping

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsWriter:
    """Writes scalar records to `<workdir>/metrics.jsonl` and `<workdir>/tensorboard/`."""

    def __init__(self, workdir: str | pathlib.Path):
        from tensorboardX import SummaryWriter  # imported here: only runs that write metrics need it

        self.workdir = pathlib.Path(workdir)
        self._jsonl = open(self.workdir / METRICS_FILE, "a", buffering=1)  # line-buffered: survives a kill
        self._tensorboard = SummaryWriter(str(self.workdir / "tensorboard"))

    def write(self, step: int, kind: str, scalars: Mapping[str, float]) -> None:
        record = {"step": int(step), "kind": kind}
        record.update({name: float(value) for name, value in scalars.items()})
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        for name, value in scalars.items():
            self._tensorboard.add_scalar(f"{kind}/{name}", float(value), int(step))

    def close(self) -> None:
        self._jsonl.close()
        self._tensorboard.close()


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(workdir: str | pathlib.Path) -> pathlib.Path | None:
    """Draws train loss (and every eval metric) against step into `<workdir>/loss.png`; None if nothing logged.

    When a run was resumed, steps after the restore point were logged twice; the later record wins.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    train = {r["step"]: r["loss"] for r in records if r["kind"] == "train" and math.isfinite(r.get("loss", math.nan))}
    if not train:
        return None
    evals: dict[str, dict[int, float]] = {}
    for record in records:
        if record["kind"] == "eval":
            for name, value in record.items():
                if name not in ("step", "kind"):
                    evals.setdefault(name, {})[record["step"]] = value
    figure, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    steps = sorted(train)
    axes[0, 0].plot(steps, [train[s] for s in steps], linewidth=0.8)
    axes[0, 0].set(xlabel="step", ylabel="train loss (nats/token)", title="training loss")
    if evals:
        for name, series in sorted(evals.items()):
            eval_steps = sorted(series)
            axes[0, 1].plot(eval_steps, [series[s] for s in eval_steps], marker="o", label=name)
        axes[0, 1].set(xlabel="step", title="evaluation")
        axes[0, 1].legend(fontsize=8)
    figure.tight_layout()
    path = pathlib.Path(workdir) / PLOT_FILE
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
