"""Class-conditional image diffusion with a DiT (Peebles & Xie, 2023, arXiv 2212.09748) on the 8x8 digits.

Plugs into `train.trainer.train` (see its docstring for the task interface):
- loss: DiT's training loss (`models.diffusion.training_losses`): ε-MSE, plus the variational bound of the learned
  variance when `learn_sigma`; each step's rng draws the timesteps, the noise and the label dropout.
- evaluate: held-out ε-MSE on fixed seeded (x_0, t, ε) triples from the test split, conditioned on the true labels:
  deterministic, so it is the regression number when swapping attention mechanisms (spec §4(d) metric 1).
- finish: samples `samples_per_class` digits of every class with classifier-free guidance, draws a grid into
  `<output dir>/samples.png`, and scores them with the project's own digits classifier (`train.digits_classifier`):
  the share classified as their conditioning label, and the Fréchet distance of its features to the real test
  images, beside the same distance for real training images (the floor) and for the baseline guidance scales
  (scale 0 is the unconditional model). The numbers are printed and written to `<output dir>/samples.json`.

The data are images in [0, 1]; the diffusion runs on x * 2 - 1 in [-1, 1], the range DDPM assumes (Ho et al., 2020,
§3.3) and the one that predicted x_0 is clipped to while sampling.
"""

import dataclasses
import functools
import json
import pathlib
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import diffusion as diffusion_lib
from models.dit import DiT, DiTConfig
from models.layers.mixers import call_with_auxiliary_loss
from train.data.digits import DigitsData
from train.digits_classifier import frechet_distance, train_classifier

SAMPLERS = ("ddim", "ddpm")
SAMPLES_PNG = "samples.png"
SAMPLES_JSON = "samples.json"


@dataclasses.dataclass
class ClassConditionalDiffusion:
    """Trains `model` to generate `data`'s images given their labels.

    schedule, num_timesteps: the training diffusion (`models.diffusion.beta_schedule`).
    data_levels: the number of grey levels of the data (17 for the digits' 0..16), which sets the bin of the
        discretised decoder likelihood in the variational bound.
    eval_repeats: (t, ε) draws per test image for the held-out ε-MSE, from `eval_seed`.
    sampler, sampling_steps, ddim_eta: how finish() samples: DDIM or DDPM over `sampling_steps` evenly respaced steps.
    cfg_scale: the guidance scale of the reported samples; baseline_cfg_scales are scored as well (0: the
        unconditional model, 1: the conditional model without guidance). cfg_all_channels=False reproduces DiT's
        guidance of output channels [:3] only.
    samples_per_class: samples per label for the accuracy and the Fréchet distance; grid_columns of them per class
        are drawn. output_dir: where the PNG and JSON go; None: the run's workdir (which the trainer passes to
        finish()), or the current directory when finish() is called without one.
    classifier_steps: optimizer steps of the scoring classifier (cached per process).
    """

    model: DiTConfig = dataclasses.field(default_factory=DiTConfig)
    data: DigitsData = dataclasses.field(default_factory=DigitsData)
    schedule: Literal["linear", "squaredcos_cap_v2"] = "linear"
    num_timesteps: int = 1000
    data_levels: int = 17
    eval_repeats: int = 2
    eval_batch_size: int = 300
    eval_seed: int = 0
    sampler: Literal["ddim", "ddpm"] = "ddim"
    sampling_steps: int = 50
    ddim_eta: float = 0.0
    cfg_scale: float = 2.0
    cfg_all_channels: bool = True
    baseline_cfg_scales: tuple[float, ...] = (0.0, 1.0)
    samples_per_class: int = 50
    grid_columns: int = 10
    sample_batch_size: int = 250
    sample_seed: int = 0
    output_dir: str | None = None
    classifier_steps: int = 1500

    def __post_init__(self):
        self.baseline_cfg_scales = tuple(float(s) for s in self.baseline_cfg_scales)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"ClassConditionalDiffusion.sampler={self.sampler!r}; allowed: {SAMPLERS}")
        if self.schedule not in diffusion_lib.SCHEDULES:
            raise ValueError(f"ClassConditionalDiffusion.schedule={self.schedule!r}; allowed: "
                             f"{diffusion_lib.SCHEDULES}")
        if not isinstance(self.num_timesteps, int) or self.num_timesteps < 2:
            raise ValueError(f"ClassConditionalDiffusion.num_timesteps must be an int >= 2, got "
                             f"{self.num_timesteps!r}")
        if not isinstance(self.sampling_steps, int) or not 1 <= self.sampling_steps <= self.num_timesteps:
            raise ValueError(f"ClassConditionalDiffusion.sampling_steps must be an int in [1, num_timesteps="
                             f"{self.num_timesteps}], got {self.sampling_steps!r}")
        for name in ("eval_repeats", "eval_batch_size", "samples_per_class", "sample_batch_size", "classifier_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ClassConditionalDiffusion.{name} must be a positive int, got {value!r}")
        if not 0 <= self.grid_columns <= self.samples_per_class:
            raise ValueError(f"ClassConditionalDiffusion.grid_columns={self.grid_columns} must be in "
                             f"[0, samples_per_class={self.samples_per_class}]")
        if self.samples_per_class * self.model.num_classes < 2:
            raise ValueError("ClassConditionalDiffusion: at least 2 samples are needed for a Fréchet distance")
        if not self.ddim_eta >= 0:
            raise ValueError(f"ClassConditionalDiffusion.ddim_eta must be >= 0, got {self.ddim_eta!r}")
        if not isinstance(self.data_levels, int) or self.data_levels < 2:
            raise ValueError(f"ClassConditionalDiffusion.data_levels must be an int >= 2, got {self.data_levels!r}")
        images, labels = self.data.arrays("train")
        size, channels = self.model.input_size, self.model.in_channels
        if images.shape[1:] != (size, size, channels):
            raise ValueError(f"the data's images are {images.shape[1:]} but DiTConfig expects "
                             f"({size}, {size}, {channels}) (input_size, input_size, in_channels)")
        if labels.max() >= self.model.num_classes:
            raise ValueError(f"the data has labels up to {labels.max()} but DiTConfig.num_classes="
                             f"{self.model.num_classes}")

    @functools.cached_property
    def diffusion(self) -> diffusion_lib.Diffusion:
        return diffusion_lib.make_diffusion(self.schedule, self.num_timesteps)

    @functools.cached_property
    def sampling_diffusion(self) -> diffusion_lib.Diffusion:
        """The training diffusion respaced to `sampling_steps` (one object: it is a static argument of the jit)."""
        return diffusion_lib.respace(self.diffusion, self.sampling_steps)

    @property
    def bin_half_width(self) -> float:
        return 1.0 / (self.data_levels - 1)  # levels 2/(L - 1) apart in [-1, 1]

    # ---- Training ----

    @property
    def tokens_per_step(self) -> int:
        return self.data.batch_size * self.model.num_patches  # patch tokens, for the trainer's tokens/s

    def build_model(self, rngs: nnx.Rngs) -> DiT:
        return DiT(self.model, rngs=rngs)

    def train_iterator(self, process_index: int, process_count: int):
        return self.data.train_iterator(process_index, process_count)

    def loss_fn(self, model: DiT, batch: dict[str, jax.Array], rng: jax.Array
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean DiT loss over the batch at uniformly drawn steps t, with label dropout for guidance."""
        x0 = batch["image"].astype(jnp.float32) * 2 - 1
        labels = batch["label"].astype(jnp.int32)
        t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
        t = jax.random.randint(t_rng, labels.shape, 0, self.diffusion.num_timesteps)
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
        auxiliary = []  # what the model sows (MoH's balance loss), caught on the way through the loss terms

        def model_fn(xt, t_model):
            out, sown = call_with_auxiliary_loss(model, xt, t_model, labels, train=True, rng=drop_rng)
            auxiliary.append(sown)
            return out

        terms = diffusion_lib.training_losses(self.diffusion, model_fn, x0, t, noise,
                                              learn_sigma=self.model.learn_sigma,
                                              bin_half_width=self.bin_half_width)
        loss, metrics = terms["loss"].mean(), {"mse": terms["mse"].mean(), "vb": terms["vb"].mean()}
        if auxiliary and auxiliary[0] is not None:
            metrics["auxiliary_loss"] = auxiliary[0]
            loss = loss + auxiliary[0]
        return loss, metrics

    # ---- Evaluation ----

    @functools.cached_property
    def _eval_batches(self) -> list[tuple[np.ndarray, ...]]:
        """Fixed (x_0, label, t, ε, weight) batches; padding rows have weight 0 (whole batches: one compile)."""
        images, labels = self.data.arrays("test")
        rng = np.random.default_rng(self.eval_seed)
        x0 = np.tile(images * 2 - 1, (self.eval_repeats, 1, 1, 1)).astype(np.float32)
        y = np.tile(labels, self.eval_repeats).astype(np.int32)
        t = rng.integers(0, self.num_timesteps, len(y)).astype(np.int32)
        eps = rng.standard_normal(x0.shape).astype(np.float32)
        weight = np.ones(len(y), np.float32)
        pad = -len(y) % self.eval_batch_size
        arrays = [np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in (x0, y, t, eps, weight)]
        size = self.eval_batch_size
        return [tuple(a[i : i + size] for a in arrays) for i in range(0, len(arrays[0]), size)]

    def evaluate(self, model: DiT) -> dict[str, float]:
        """Held-out ε-MSE and mean variational-bound term L_t (bits/dim) over the fixed test triples."""
        graphdef, state = nnx.split(model)
        totals = np.zeros(2)
        count = 0.0
        for x0, y, t, eps, weight in self._eval_batches:
            totals += np.asarray(_eval_sums(graphdef, state, self.diffusion, self.model.learn_sigma,
                                            self.bin_half_width, x0, y, t, eps, weight))
            count += float(weight.sum())
        return {"eval_eps_mse": float(totals[0] / count), "eval_vb": float(totals[1] / count)}

    def describe_evaluation(self, step: int, results: dict[str, float]) -> str:
        count = sum(int(batch[-1].sum()) for batch in self._eval_batches)
        vb = f", mean VLB term {results['eval_vb']:.4f} bits/dim" if self.model.learn_sigma else ""
        return (f"step {step}: held-out ε-MSE {results['eval_eps_mse']:.4f}{vb}  (fixed seeded (x0, t, ε) on "
                f"{count} test examples; predicting ε = 0 scores 1.0)")

    # ---- End of training ----

    def sample(self, model: DiT, labels: np.ndarray, rng: jax.Array, cfg_scale: float) -> np.ndarray:
        """Images [n, H, W, C] in [0, 1] of the given labels, from `sampler` over `sampling_steps` steps."""
        graphdef, state = nnx.split(model)
        sampling = self.sampling_diffusion
        size, channels = self.model.input_size, self.model.in_channels
        out = []
        for start in range(0, len(labels), self.sample_batch_size):
            batch = np.asarray(labels[start : start + self.sample_batch_size], np.int32)
            pad = self.sample_batch_size - len(batch)  # whole batches: one compile
            batch_rng = jax.random.fold_in(rng, start)
            noise = jax.random.normal(jax.random.fold_in(batch_rng, 0), (self.sample_batch_size, size, size, channels))
            x = _sample(graphdef, state, sampling, self.sampler, self.model.learn_sigma, self.cfg_all_channels,
                        float(self.ddim_eta), noise, jnp.asarray(np.pad(batch, (0, pad))),
                        jax.random.fold_in(batch_rng, 1), jnp.float32(cfg_scale))
            out.append(np.asarray(x)[: len(batch)])
        return np.clip((np.concatenate(out) + 1) / 2, 0, 1)

    def finish(self, model: DiT, rng: jax.Array, workdir: str | None = None) -> dict:
        """Samples, scores, draws and saves (see the module docstring); returns the JSON record."""
        began = time.perf_counter()
        output_dir = pathlib.Path(self.output_dir or workdir or ".")
        output_dir.mkdir(parents=True, exist_ok=True)
        classifier = train_classifier(self.data.test_fraction, self.data.split_seed, steps=self.classifier_steps)
        test_images, _ = self.data.arrays("test")
        train_images, _ = self.data.arrays("train")
        test_features = classifier.features(test_images)
        labels = np.repeat(np.arange(self.model.num_classes), self.samples_per_class).astype(np.int32)
        # The trainer's `rng` is not used: a fixed seed starts every run (any attention mechanism, any length) from
        # the same noise, so their samples differ by the model only.
        rng = jax.random.key(self.sample_seed)

        def score(images: np.ndarray) -> dict:
            correct = classifier.predict(images) == labels
            return {"accuracy": float(correct.mean()),
                    "per_class_accuracy": [float(correct[labels == c].mean()) for c in range(self.model.num_classes)],
                    "frechet_distance": frechet_distance(classifier.features(images), test_features)}

        # The same noise for every scale, so the scales differ by guidance only.
        images = self.sample(model, labels, rng, self.cfg_scale)
        record = {"cfg_scale": self.cfg_scale, **score(images)}
        record["baselines"] = {f"cfg_scale_{s:g}": score(self.sample(model, labels, rng, s))
                               for s in self.baseline_cfg_scales}
        # Real training images, as many as the samples (the distance is biased upwards by small sets).
        subset = np.random.default_rng(self.sample_seed).choice(len(train_images), min(len(labels),
                                                                                       len(train_images)), False)
        record["real_train_vs_test_frechet_distance"] = frechet_distance(classifier.features(train_images[subset]),
                                                                         test_features)
        record.update(
            classifier_test_accuracy=classifier.test_accuracy, num_samples=len(labels),
            num_test_images=len(test_images), sampler=self.sampler, sampling_steps=self.sampling_steps,
            ddim_eta=self.ddim_eta, cfg_all_channels=self.cfg_all_channels, schedule=self.schedule,
            num_timesteps=self.num_timesteps, model=dataclasses.asdict(self.model))
        record["seconds"] = time.perf_counter() - began
        (output_dir / SAMPLES_JSON).write_text(json.dumps(record, indent=2) + "\n")
        png = self._draw_grid(images, labels, record, output_dir / SAMPLES_PNG)
        print(self.describe_samples(record) + f"\nSample grid: {png}\nNumbers: {output_dir / SAMPLES_JSON}")
        return record

    def describe_samples(self, record: dict) -> str:
        lines = [f"\nSamples: {record['num_samples']} ({self.samples_per_class} per class), {self.sampler.upper()} "
                 f"{self.sampling_steps} steps, guidance scale {record['cfg_scale']:g}:",
                 f"  classified as their label: {100 * record['accuracy']:.1f}%   Fréchet distance to the "
                 f"{record['num_test_images']} test images: {record['frechet_distance']:.2f}"]
        for name, baseline in record["baselines"].items():
            lines.append(f"  baseline {name}: {100 * baseline['accuracy']:.1f}%, Fréchet distance "
                         f"{baseline['frechet_distance']:.2f}")
        lines.append(f"  floor: real training images {record['real_train_vs_test_frechet_distance']:.2f}; the "
                     f"classifier scores {100 * record['classifier_test_accuracy']:.1f}% on the real test images")
        return "\n".join(lines)

    def _draw_grid(self, images: np.ndarray, labels: np.ndarray, record: dict, path: pathlib.Path) -> pathlib.Path:
        """Rows: classes; columns: the first grid_columns samples of each class."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # no display, no global backend switch
        from matplotlib.figure import Figure

        rows, columns = self.model.num_classes, max(self.grid_columns, 1)
        figure = Figure(figsize=(0.6 * columns + 0.6, 0.6 * rows + 0.8))
        FigureCanvasAgg(figure)
        axes = figure.subplots(rows, columns, squeeze=False)
        for row in range(rows):
            row_images = images[labels == row]
            for column in range(columns):
                axis = axes[row, column]
                axis.set_xticks([])
                axis.set_yticks([])
                if column < min(self.grid_columns, len(row_images)):
                    axis.imshow(row_images[column, ..., 0], cmap="gray_r", vmin=0, vmax=1)
                if column == 0:
                    axis.set_ylabel(str(row), rotation=0, labelpad=8, va="center")
        figure.suptitle(f"DiT {self.sampler.upper()} {self.sampling_steps} steps, cfg {record['cfg_scale']:g}: "
                        f"{100 * record['accuracy']:.0f}% classified as their row, FD "
                        f"{record['frechet_distance']:.1f}", fontsize=8)
        figure.savefig(path, dpi=100)
        return path


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))
def _eval_sums(graphdef, state, diffusion, learn_sigma, bin_half_width, x0, y, t, eps, weight):
    model = nnx.merge(graphdef, state)
    terms = diffusion_lib.training_losses(diffusion, lambda xt, tm: model(xt, tm, y), x0, t, eps,
                                          learn_sigma=learn_sigma, bin_half_width=bin_half_width)
    return jnp.stack([jnp.sum(terms["mse"] * weight), jnp.sum(terms["vb"] * weight)])


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4, 5, 6))
def _sample(graphdef, state, diffusion, sampler, learn_sigma, all_channels, eta, noise, labels, rng, cfg_scale):
    model = nnx.merge(graphdef, state)
    model_fn = lambda x, t: model.forward_with_cfg(x, t, labels, cfg_scale, all_channels=all_channels)
    if sampler == "ddim":
        x = diffusion_lib.ddim_sample(diffusion, model_fn, noise, rng, eta=eta)
    else:
        x = diffusion_lib.ddpm_sample(diffusion, model_fn, noise, rng, learn_sigma=learn_sigma)
    return x
