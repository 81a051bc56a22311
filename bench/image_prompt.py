"""Image-prompt conditioning of the digits DiT (issue 6): IP-Adapter's decoupled cross-attention (Ye et al., 2023,
arXiv 2308.06721) in every DiT block, conditioned on the embedding of a reference digit image instead of its label.

    python -m bench.image_prompt [--steps 3000] [--workdir bench/out/image_prompt]
    (= python -m train --gin_file=configs/experiments/dit_image_prompt.gin --workdir=...)

Setup. The image encoder stands in for CLIP: a second copy of the project's digits classifier
(`train.digits_classifier`, MLP 64 -> 256 -> 64 -> 10) trained with another seed (`encoder_seed`), frozen; its
64-d penultimate features of the reference image are the "image embedding" that `ImageProjModel` maps to M prompt
tokens. The scoring classifier is the seed-0 copy that scores every DiT run, so the encoder is not the judge. As in
IP-Adapter's training the reference is the training image itself, and its embedding is zeroed with probability
`image_dropout_prob` (the code's drop_image_embed, 0.05 there) so that guidance has an unconditional model. With
use_labels=False (the default) the labels are always the null class: the image prompt is the only condition, and
everything (DiT and adapter) is trained jointly from scratch, since there is no pretrained digits DiT to freeze.

Measure. For each reference image of the test split (`references_per_class` per class) one sample per scale
lambda in `scales`, from the same noise, with the image prompt's classifier-free guidance (unconditional = zero
image embedding and null label, as IP-Adapter's `proj(zeros)`) at `cfg_scale` and without guidance (scale 1): the
share of samples the scoring classifier assigns to the reference's class, and the Fréchet distance of its features
to the real test images. lambda = 0 removes the image stream entirely (the unconditional model: about 10%).
Output: <workdir>/image_prompt.json and image_prompt.png (first row: references; then one row per lambda).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import diffusion as diffusion_lib
from models.dit import DiT
from models.layers.mixers import call_with_auxiliary_loss
from train.digits_classifier import HIDDEN, frechet_distance, train_classifier
from train.image_diffusion import ClassConditionalDiffusion

RESULTS_JSON = "image_prompt.json"
RESULTS_PNG = "image_prompt.png"


def encode(params: dict, images: jax.Array) -> jax.Array:
    """The frozen encoder: images [B, H, W, 1] in [0, 1] -> the classifier's penultimate features [B, HIDDEN[-1]]."""
    x = images.reshape(images.shape[0], -1).astype(jnp.float32)
    x = jax.nn.gelu(x @ params["w1"] + params["b1"])
    return jax.lax.stop_gradient(jax.nn.gelu(x @ params["w2"] + params["b2"]))


@dataclasses.dataclass
class ImagePromptDiffusion:
    """A trainer task (train/trainer.py) around a `ClassConditionalDiffusion` whose DiT has image_prompt_tokens > 0.

    base: the class-conditional digits task (its model, data, diffusion, sampler and sampling settings are used).
    encoder_seed, encoder_steps: the frozen image encoder (a digits classifier of another seed than the scorer).
    use_labels: also condition on the label (dropped as base.model.class_dropout_prob says); False: null labels.
    image_dropout_prob: probability of zeroing a training example's image embedding (for guidance).
    scales: the lambdas sampled at the end; cfg_scale: the image prompt's guidance scale (1: none).
    references_per_class: test images per class used as references (one sample each, per lambda).
    """

    base: ClassConditionalDiffusion = dataclasses.field(default_factory=ClassConditionalDiffusion)
    encoder_seed: int = 1
    encoder_steps: int = 1500
    use_labels: bool = False
    image_dropout_prob: float = 0.1
    scales: tuple[float, ...] = (0.0, 0.5, 1.0)
    cfg_scale: float = 1.5
    references_per_class: int = 20
    grid_columns: int = 10
    output_dir: str | None = None

    def __post_init__(self):
        self.scales = tuple(float(s) for s in self.scales)
        model = self.base.model
        if model.image_prompt_tokens < 1:
            raise ValueError("ImagePromptDiffusion: base.model (DiTConfig) needs image_prompt_tokens >= 1, got "
                             f"{model.image_prompt_tokens}")
        if model.image_prompt_dim != HIDDEN[-1]:
            raise ValueError(f"ImagePromptDiffusion: DiTConfig.image_prompt_dim={model.image_prompt_dim} must equal "
                             f"the encoder's feature width {HIDDEN[-1]}")
        if not 0 <= self.image_dropout_prob < 1:
            raise ValueError(f"ImagePromptDiffusion.image_dropout_prob must be in [0, 1), got "
                             f"{self.image_dropout_prob!r}")
        if not isinstance(self.references_per_class, int) or self.references_per_class < 1:
            raise ValueError(f"ImagePromptDiffusion.references_per_class must be a positive int, got "
                             f"{self.references_per_class!r}")
        if not self.scales:
            raise ValueError("ImagePromptDiffusion.scales must name at least one lambda")

    @functools.cached_property
    def encoder_params(self) -> dict[str, np.ndarray]:
        data = self.base.data
        # First needed inside the traced loss: trained eagerly (and cached) all the same.
        with jax.ensure_compile_time_eval():
            classifier = train_classifier(data.test_fraction, data.split_seed, seed=self.encoder_seed,
                                          steps=self.encoder_steps)
        return dict(classifier.params)  # numpy: a constant wherever it is used, never a tracer kept by the cache

    # ---- Training (trainer interface) ----

    @property
    def tokens_per_step(self) -> int:
        return self.base.tokens_per_step

    def build_model(self, rngs: nnx.Rngs) -> DiT:
        return self.base.build_model(rngs)

    def train_iterator(self, process_index: int, process_count: int):
        return self.base.train_iterator(process_index, process_count)

    def loss_fn(self, model: DiT, batch: dict, rng: jax.Array):
        """DiT's loss with the batch's own images as image prompts (zeroed with image_dropout_prob)."""
        images = batch["image"].astype(jnp.float32)
        x0 = images * 2 - 1
        labels = batch["label"].astype(jnp.int32)
        t_rng, noise_rng, label_rng, image_rng = jax.random.split(rng, 4)
        keep = jax.random.bernoulli(image_rng, 1 - self.image_dropout_prob, labels.shape)
        embeds = encode(self.encoder_params, images) * keep[:, None]
        t = jax.random.randint(t_rng, labels.shape, 0, self.base.diffusion.num_timesteps)
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
        labels = self._labels(labels)

        def model_fn(xt, t_model):
            out, _ = call_with_auxiliary_loss(model, xt, t_model, labels, train=True, rng=label_rng,
                                              image_embeds=embeds)
            return out

        terms = diffusion_lib.training_losses(self.base.diffusion, model_fn, x0, t, noise,
                                              learn_sigma=self.base.model.learn_sigma,
                                              bin_half_width=self.base.bin_half_width)
        return terms["loss"].mean(), {"mse": terms["mse"].mean(), "vb": terms["vb"].mean()}

    def _labels(self, labels):
        """The labels the DiT sees: the null class (row num_classes of its table) unless use_labels."""
        return labels if self.use_labels else jnp.full_like(labels, self.base.model.num_classes)

    # ---- End of training ----

    def references(self) -> tuple[np.ndarray, np.ndarray]:
        """references_per_class test images of each class (the first ones of the fixed split), and their labels."""
        images, labels = self.base.data.arrays("test")
        chosen = np.concatenate([np.flatnonzero(labels == c)[: self.references_per_class]
                                 for c in range(self.base.model.num_classes)])
        return images[chosen], labels[chosen]

    def sample(self, model: DiT, reference_images: np.ndarray, labels: np.ndarray, scale: float,
               cfg_scale: float, seed: int = 0) -> np.ndarray:
        """One image [H, W, C] in [0, 1] per reference, with the image stream at weight `scale`."""
        graphdef, state = nnx.split(model)
        size, channels = self.base.model.input_size, self.base.model.in_channels
        noise = jax.random.normal(jax.random.key(seed), (len(labels), size, size, channels))
        embeds = encode(self.encoder_params, jnp.asarray(reference_images))
        x = _sample(graphdef, state, self.base.sampling_diffusion, noise, self._labels(jnp.asarray(labels, jnp.int32)),
                    embeds, jnp.float32(scale), jnp.float32(cfg_scale))
        return np.clip((np.asarray(x) + 1) / 2, 0, 1)

    def finish(self, model: DiT, rng: jax.Array, workdir: str | None = None) -> dict:
        del rng  # a fixed seed: every run starts from the same noise
        began = time.perf_counter()
        output_dir = pathlib.Path(self.output_dir or workdir or ".")
        output_dir.mkdir(parents=True, exist_ok=True)
        data = self.base.data
        classifier = train_classifier(data.test_fraction, data.split_seed, steps=self.base.classifier_steps)
        test_features = classifier.features(data.arrays("test")[0])
        references, labels = self.references()
        record = {"reference_class_share": {}, "frechet_distance": {}, "per_class": {}}
        grid = {}
        for guidance in sorted({1.0, self.cfg_scale}):
            for scale in self.scales:
                images = self.sample(model, references, labels, scale, guidance)
                name = f"lambda_{scale:g}_cfg_{guidance:g}"
                correct = classifier.predict(images) == labels
                record["reference_class_share"][name] = float(correct.mean())
                record["per_class"][name] = [float(correct[labels == c].mean())
                                             for c in range(self.base.model.num_classes)]
                record["frechet_distance"][name] = frechet_distance(classifier.features(images), test_features)
                if guidance == self.cfg_scale:
                    grid[scale] = images
        record.update(
            scales=list(self.scales), cfg_scale=self.cfg_scale, use_labels=self.use_labels,
            image_dropout_prob=self.image_dropout_prob, num_references=len(labels),
            encoder_test_accuracy=train_classifier(data.test_fraction, data.split_seed, seed=self.encoder_seed,
                                                   steps=self.encoder_steps).test_accuracy,
            classifier_test_accuracy=classifier.test_accuracy, sampler=self.base.sampler,
            sampling_steps=self.base.sampling_steps,
            model={k: v for k, v in dataclasses.asdict(self.base.model).items() if k != "attention_kwargs"},
            seconds=time.perf_counter() - began)
        (output_dir / RESULTS_JSON).write_text(json.dumps(record, indent=2) + "\n")
        png = self._draw(references, labels, grid, output_dir / RESULTS_PNG)
        print(describe(record) + f"\nGrid: {png}\nNumbers: {output_dir / RESULTS_JSON}")
        return record

    def _draw(self, references, labels, grid, path: pathlib.Path) -> pathlib.Path:
        """Columns: the first reference of each class (up to grid_columns); rows: references, then each lambda."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        columns = [int(np.flatnonzero(labels == c)[0]) for c in range(self.base.model.num_classes)]
        columns = columns[: max(self.grid_columns, 1)]
        rows = [("reference", references)] + [(f"λ={s:g}", images) for s, images in grid.items()]
        figure = Figure(figsize=(0.6 * len(columns) + 0.9, 0.6 * len(rows) + 0.6))
        FigureCanvasAgg(figure)
        axes = figure.subplots(len(rows), len(columns), squeeze=False)
        for r, (name, images) in enumerate(rows):
            for c, index in enumerate(columns):
                axis = axes[r, c]
                axis.set_xticks([])
                axis.set_yticks([])
                axis.imshow(images[index, ..., 0], cmap="gray_r", vmin=0, vmax=1)
                if c == 0:
                    axis.set_ylabel(name, rotation=0, labelpad=22, va="center", fontsize=7)
        figure.suptitle(f"DiT + IP-Adapter on digits, cfg {self.cfg_scale:g}", fontsize=8)
        figure.savefig(path, dpi=100)
        return path


def describe(record: dict) -> str:
    lines = [f"\nImage-prompted samples: {record['num_references']} references, {record['sampler'].upper()} "
             f"{record['sampling_steps']} steps; share classified as the reference's class (Fréchet distance):"]
    for name, share in record["reference_class_share"].items():
        lines.append(f"  {name:>20}: {100 * share:5.1f}%  ({record['frechet_distance'][name]:.2f})")
    lines.append(f"  scorer {100 * record['classifier_test_accuracy']:.1f}% / encoder "
                 f"{100 * record['encoder_test_accuracy']:.1f}% on the real test images")
    return "\n".join(lines)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _sample(graphdef, state, diffusion, noise, labels, embeds, scale, cfg_scale):
    model = nnx.merge(graphdef, state)
    model_fn = lambda x, t: model.forward_with_cfg(x, t, labels, cfg_scale, image_embeds=embeds,
                                                   image_prompt_scale=scale)
    return diffusion_lib.ddim_sample(diffusion, model_fn, noise)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.image_prompt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the gin file's STEPS)")
    parser.add_argument("--workdir", default="bench/out/image_prompt")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from train import __main__ as train_main

    command = ["--gin_file=configs/experiments/dit_image_prompt.gin", f"--workdir={args.workdir}"]
    if args.steps is not None:
        command.append(f"--gin_bindings=STEPS = {args.steps}")
    return train_main.main(command)


if __name__ == "__main__":
    sys.exit(main())
