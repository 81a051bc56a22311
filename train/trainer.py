"""The one training loop, composed by arguments: a task supplies the model, data, loss, evaluation and finish.

A task is any object with:
    build_model(rngs) -> nnx.Module
    train_iterator(process_index, process_count) -> grain.DatasetIterator of dicts of numpy arrays (this process's
                                                    share of the global batch)
    loss_fn(model, batch, rng) -> (scalar loss, dict of scalar metrics)   traced inside jit; rng differs per step
    tokens_per_step -> int                                                for the tokens/s display
    evaluate(model) -> dict[str, float]                                   optional; called every `eval_every` steps
    describe_evaluation(step, results) -> str                             optional; the line printed after evaluate
    finish(model, rng, workdir) -> None                                   optional; called once when training ends,
                                                                          with the run's workdir for its outputs

Running again with the same workdir resumes from the newest readable checkpoint. SIGTERM finishes the current step,
saves a checkpoint and returns normally (`TrainResult.interrupted`), so a preempted job can be restarted as is.
"""

import contextlib
import dataclasses
import pathlib
import signal
import threading
import time
from typing import Any, Callable, Literal

import jax
from flax import nnx
from tqdm import tqdm

from train import checkpoint as checkpoint_lib
from train import metrics as metrics_lib
from train import sharding
from train.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
from train.step import check_step_options, init_train_state, make_train_step

NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """Raised when a step's loss or gradient norm is NaN/inf and `on_nonfinite="stop"`."""


@dataclasses.dataclass
class TrainResult:
    final_step: int
    start_step: int
    losses: dict[int, float]
    interrupted: bool
    evaluations: dict[int, dict[str, float]]
    params: Any
    compilations: int = 1  # times the train step was compiled in this run (1: no recompilation)


def train(
    task: Any,
    *,
    workdir: str,
    steps: int,
    optimizer: OptimizerConfig = OptimizerConfig(),
    seed: int = 0,
    eval_every: int = 0,
    log_every: int = 1,
    checkpoint_every: int = 100,
    keep_checkpoints: int = 3,
    async_checkpoints: bool = True,
    on_nonfinite: Literal["stop", "skip"] = "stop",
    mesh: sharding.MeshConfig = sharding.MeshConfig(),
    gradient_accumulation: int = 1,
    compute_dtype: Literal["float32", "bfloat16"] | None = None,
    progress_bar: bool = True,
    stop_event: threading.Event | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Trains `task` for `steps` optimizer steps in total (counting steps of earlier runs in `workdir`).

    eval_every=0 evaluates only at the end. checkpoint_every=0 saves no checkpoints at all (benchmarks, tests; a run
    stopped early is then lost); otherwise one is saved every `checkpoint_every` steps and at the end. `stop_event`
    (set by SIGTERM, or by a caller) stops after the current step with a checkpoint.

    gradient_accumulation=n splits each batch into n microbatches, one optimizer update (same result, 1/n of the
    activation memory); compute_dtype='bfloat16' computes in bfloat16 with float32 master weights and optimizer
    state (train/step.py). Model-side memory knobs live in the model's config (LLMConfig.remat, scan_layers).

    `on_step(step, metrics)` is called after every step, e.g. by tests.
    """
    _validate(steps=steps, eval_every=eval_every, log_every=log_every, checkpoint_every=checkpoint_every,
              on_nonfinite=on_nonfinite)
    check_step_options(gradient_accumulation, compute_dtype)
    workdir_path = pathlib.Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    is_main_process = jax.process_index() == 0
    say = tqdm.write if is_main_process else (lambda *_: None)
    stop_event = stop_event or threading.Event()
    with contextlib.ExitStack() as cleanup:  # undone in reverse order on every exit path, errors included
        cleanup.callback(_stop_on_sigterm(stop_event, say))
        run = _Run(task, workdir_path, steps, optimizer, seed, mesh, keep_checkpoints, async_checkpoints,
                   on_nonfinite, gradient_accumulation, compute_dtype, say, cleanup)
        writer = metrics_lib.MetricsWriter(workdir_path) if is_main_process else None
        if writer:
            cleanup.callback(writer.close)
        bar = tqdm(total=steps, initial=run.start_step, unit="step", dynamic_ncols=True,
                   disable=not (progress_bar and is_main_process),
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, ETA {remaining}{postfix}]")
        cleanup.callback(bar.close)
        schedule = learning_rate_schedule(optimizer, steps)
        losses: dict[int, float] = {}
        evaluations: dict[int, dict[str, float]] = {}
        tokens_per_second = None
        interrupted = False
        while run.step < steps:
            began = time.perf_counter()
            step, step_metrics, finite = run.train_one_step()
            if step > run.start_step + 1:  # the first step of a run includes compilation
                rate = task.tokens_per_step / (time.perf_counter() - began)
                tokens_per_second = rate if tokens_per_second is None else 0.9 * tokens_per_second + 0.1 * rate
            losses[step] = step_metrics["loss"]
            if writer and (step % log_every == 0 or not finite):
                record = dict(step_metrics, learning_rate=float(schedule(step - 1)), skipped=float(not finite))
                if tokens_per_second:
                    record["tokens_per_second"] = tokens_per_second
                writer.write(step, "train", record)
            bar.set_postfix_str(f"loss={step_metrics['loss']:.3f}" + (
                f", {tokens_per_second:,.0f} tok/s" if tokens_per_second else ""), refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(step, step_metrics)
            if hasattr(task, "evaluate") and ((eval_every and step % eval_every == 0) or step == steps):
                evaluations[step] = results = task.evaluate(run.model())
                if writer:
                    writer.write(step, "eval", results)
                describe = getattr(task, "describe_evaluation", None)
                say(describe(step, results) if describe else f"step {step}: {results}")
            if checkpoint_every and (step % checkpoint_every == 0 or step == steps):
                run.save_checkpoint()
            if stop_event.is_set() and step < steps:
                if checkpoint_every:
                    run.save_checkpoint()
                    say(f"Stop requested: saved a checkpoint at step {step}; run again with the same workdir to "
                        "resume")
                else:
                    say(f"Stop requested: stopped at step {step} without a checkpoint (checkpoint_every=0)")
                interrupted = True
                break
    # Here every checkpoint is on disk (the checkpointer's close waited for the asynchronous writes).
    if run.compilations() > 1:
        say(f"WARNING: the train step compiled {run.compilations()} times; a batch shape, dtype or sharding changed "
            "between steps (each change costs a full compile)")

    if is_main_process:
        plot = metrics_lib.plot_losses(workdir_path)
        if plot:
            say(f"Loss plot: {plot}")
    if not interrupted and run.step == steps and hasattr(task, "finish"):
        rng = jax.random.fold_in(jax.random.wrap_key_data(run.state["rng"]), run.step)
        task.finish(run.model(), rng, workdir=str(workdir_path))
    return TrainResult(final_step=run.step, start_step=run.start_step, losses=losses, interrupted=interrupted,
                       evaluations=evaluations, params=run.state["params"], compilations=run.compilations())


class _Run:
    """The mutable part of one `train` call: model structure, train state, data iterator, checkpointer, step."""

    def __init__(self, task, workdir, steps, optimizer, seed, mesh, keep_checkpoints, async_checkpoints,
                 on_nonfinite, gradient_accumulation, compute_dtype, say, cleanup: contextlib.ExitStack):
        self.mesh = sharding.make_mesh(mesh)
        self.on_nonfinite = on_nonfinite
        self.say = say
        tx = make_optimizer(optimizer, steps)
        self.graphdef, self.train_graphdef, self.state, self.state_sharding, self.other_state = _initialize(
            task, seed, tx, self.mesh)
        split = sharding.describe_shardings(self.state, self.state_sharding)
        if jax.process_index() == 0:
            (workdir / "sharding.txt").write_text(
                f"mesh {dict(self.mesh.shape)}\n" + "".join(line + "\n" for line in split))
        if split:
            say(f"Mesh {dict(self.mesh.shape)}: {len(split)} train-state arrays split over devices "
                f"(listed in {workdir / 'sharding.txt'})")
        self.data_iterator = task.train_iterator(jax.process_index(), jax.process_count())
        self.checkpointer = checkpoint_lib.Checkpointer(
            workdir / "checkpoints", keep=keep_checkpoints, async_save=async_checkpoints)
        cleanup.callback(self.checkpointer.close)  # waits for asynchronous saves
        restored = self.checkpointer.restore_latest(
            checkpoint_lib.abstract_like(self.state), self.data_iterator, report=say)
        self.start_step = self.step = self.last_saved = 0
        if restored is not None:
            self.state, self.start_step = restored
            self.step = self.last_saved = self.start_step
            say(f"Resumed from the checkpoint at step {self.start_step} in {self.checkpointer.directory}")
        # Non-parameter variables (if any) are closed over: constant during training. The step runs the model in
        # NNX training mode (`model.train()`: deterministic=False), everything else in evaluation mode.
        # The state leaves the step where it came in, so every step reuses the one compiled executable.
        self._train_step = make_train_step(
            lambda p: nnx.merge(self.train_graphdef, p, self.other_state), task.loss_fn, tx,
            skip_nonfinite=on_nonfinite == "skip", gradient_accumulation=gradient_accumulation,
            compute_dtype=compute_dtype, out_shardings=(self.state_sharding, sharding.replicated(self.mesh)))

    def model(self) -> nnx.Module:
        """The current model in evaluation mode (`model.eval()`), for evaluation and the task's finish."""
        return nnx.merge(self.graphdef, self.state["params"], self.other_state)

    def train_one_step(self) -> tuple[int, dict[str, float], bool]:
        """Runs one step; returns (step number after it, its metrics, whether it was finite)."""
        batch = sharding.put_batch(self.mesh, next(self.data_iterator))
        with sharding.activation_rules(self.mesh):
            self.state, step_metrics = self._train_step(self.state, batch)
        step_metrics = {name: float(value) for name, value in jax.device_get(step_metrics).items()}
        self.step += 1
        finite = step_metrics.pop("finite") > 0
        if not finite:
            if self.on_nonfinite == "stop":
                raise NonFiniteLossError(
                    f"non-finite loss at step {self.step}: loss={step_metrics['loss']}, grad_norm="
                    f"{step_metrics['grad_norm']}; stopping (set on_nonfinite='skip' to skip such steps)")
            self.say(f"WARNING: skipped step {self.step}: loss={step_metrics['loss']}, grad_norm="
                     f"{step_metrics['grad_norm']} (parameters and optimizer state left unchanged)")
        return self.step, step_metrics, finite

    def compilations(self) -> int:
        """How many executables the train step compiled (0 before the first step): more than 1 means a shape,
        dtype or sharding changed between steps, which costs a full compile each time."""
        return self._train_step._cache_size()

    def save_checkpoint(self) -> None:
        if self.last_saved != self.step:
            self.checkpointer.save(self.step, self.state, self.data_iterator)
            self.last_saved = self.step


def _initialize(task, seed: int, tx, mesh):
    """Builds the model and the initial train state in one compiled function, placed on `mesh` by the rules of
    train/sharding.py (weights and optimizer moments split over fsdp/tensor where their axis letters say so).

    Built eagerly, every parameter initializer would be a separately compiled tiny computation (seconds of
    start-up for a small model); under jit they are one, and each device materialises only its own shards. Returns
    the graph definitions of the model in evaluation and in training mode (NNX keeps the mode flags,
    `deterministic` / `use_running_average`, in the graph definition), the train state, its shardings and the
    non-parameter state.
    """
    abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(seed)))
    abstract.train()
    train_graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
    abstract.eval()
    graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)

    def initial_state():
        _, params, other_state = nnx.split(task.build_model(nnx.Rngs(seed)), nnx.Param, ...)
        return init_train_state(params, tx, seed), other_state

    abstract_state, _ = jax.eval_shape(initial_state)
    state_sharding = sharding.state_shardings(abstract_state, mesh)
    with sharding.activation_rules(mesh):
        state, other_state = jax.jit(
            initial_state, out_shardings=(state_sharding, sharding.replicated(mesh)))()
    return graphdef, train_graphdef, state, state_sharding, other_state


def _validate(*, steps, eval_every, log_every, checkpoint_every, on_nonfinite):
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"train: steps must be an int >= 1, got {steps!r}")
    for name, value in (("eval_every", eval_every), ("log_every", log_every), ("checkpoint_every", checkpoint_every)):
        minimum = 1 if name == "log_every" else 0
        if not isinstance(value, int) or value < minimum:
            raise ValueError(f"train: {name} must be an int >= {minimum}, got {value!r}")
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"train: on_nonfinite={on_nonfinite!r}; allowed: {NONFINITE_POLICIES}")


def _stop_on_sigterm(stop_event: threading.Event, say) -> Callable[[], None]:
    """Makes SIGTERM set `stop_event` (main thread only: Python delivers signals there); returns an undo function."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handle(signum, frame):
        say("SIGTERM received: finishing the current step and saving a checkpoint")
        stop_event.set()

    previous = signal.signal(signal.SIGTERM, handle)
    return lambda: signal.signal(signal.SIGTERM, previous)
