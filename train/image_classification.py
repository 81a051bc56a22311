"""Image classification with a ViT on the 8x8 digits: label-smoothed cross-entropy, test accuracy beside the
classical baselines of the same split, and a confusion matrix at the end. Plugs into `train.trainer.train` (see
its docstring for the task interface).
"""

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models.layers.mixers import call_with_auxiliary_loss
from models.vit import ViT, ViTConfig
from train.data import digits
from train.data.digits import DigitsData

# Test accuracy of scikit-learn models on this split (DigitsData defaults: X / 16, stratified 75/25,
# random_state=0), as quoted by ../shared/specs/vision_mechanisms.md §12:
# LogisticRegression() and SVC(kernel="rbf", gamma=0.256). tests/train/test_image_classification.py refits both
# and checks these numbers, so they are measured on this very split, not copied from elsewhere.
BASELINES = {"logistic_regression": 0.969, "rbf_svm": 0.991}


@dataclasses.dataclass
class ImageClassification:
    """Trains `model` (a ViTConfig sized for the digits) to classify `data`'s images.

    label_smoothing: weight moved from the true class to a uniform distribution in the training loss (Szegedy et
    al., 2016, "Rethinking the Inception Architecture", §7). The reported test loss is the plain cross-entropy.
    eval_batch_size: images per compiled evaluation call; the test split is padded to whole batches (one compiled
    shape) and the padding is dropped before scoring.
    test_time_shifts: k > 0 also reports the accuracy of the probabilities averaged over all (2k + 1)^2 rolls of
    each test image by -k..k pixels per axis, the transformation the training augmentation (`DigitsData.max_shift`)
    draws from; the single-view accuracy is always reported beside it.
    wrapper: None trains the plain `ViT(model)`. Otherwise a callable `wrapper(model, rngs=rngs) -> nnx.Module`
    that builds a model around the ViT (in gin, a class reference without parentheses, e.g. `@dcal.DCAL`). The
    built model may bring its own objective through two optional methods, which the task then calls instead of its
    own (the default path is unchanged for models without them):
        training_loss(batch, rng, *, label_smoothing) -> (loss, metrics)   traced inside jit (DCAL's three branches
                                                                           with distractor pairs, CCA's triplets)
        evaluation_metrics(outputs, labels) -> dict[str, float]            replaces test accuracy/loss: `outputs`
                                                                           are model(images) of the whole test split
    """

    model: ViTConfig = dataclasses.field(default_factory=ViTConfig)
    data: DigitsData = dataclasses.field(default_factory=DigitsData)
    label_smoothing: float = 0.1
    eval_batch_size: int = 128
    test_time_shifts: int = 0
    wrapper: Callable[..., nnx.Module] | None = None

    def __post_init__(self):
        expected = (*self.model.image_hw, self.model.channels)
        if expected != digits.IMAGE_SHAPE:
            raise ValueError(f"ImageClassification: the model takes images {expected} but the digits are "
                             f"{digits.IMAGE_SHAPE}; set ViTConfig.image_size=8, channels=1")
        if self.model.num_classes != digits.NUM_CLASSES:
            raise ValueError(f"ImageClassification: ViTConfig.num_classes={self.model.num_classes}, the digits have "
                             f"{digits.NUM_CLASSES} classes")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"ImageClassification.label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if not isinstance(self.eval_batch_size, int) or self.eval_batch_size <= 0:
            raise ValueError(f"ImageClassification.eval_batch_size must be a positive int, got "
                             f"{self.eval_batch_size!r}")
        if not isinstance(self.test_time_shifts, int) or not 0 <= self.test_time_shifts < 4:
            raise ValueError(f"ImageClassification.test_time_shifts must be an int in [0, 3], got "
                             f"{self.test_time_shifts!r}")
        if self.wrapper is not None and not callable(self.wrapper):
            raise ValueError(f"ImageClassification.wrapper must be None or a callable wrapper(model, rngs=) -> "
                             f"nnx.Module (e.g. models.dcal.DCAL), got {self.wrapper!r}")

    # ---- Training ----

    @property
    def tokens_per_step(self) -> int:
        """Patch tokens per step (images x first-stage patches), for the trainer's tokens/s display."""
        return self.data.batch_size * self.model.num_patches

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        if self.wrapper is not None:
            return self.wrapper(self.model, rngs=rngs)
        return ViT(self.model, rngs=rngs)

    def train_iterator(self, process_index: int, process_count: int):
        return self.data.train_iterator(process_index, process_count)

    def loss_fn(self, model: ViT, batch: dict[str, jax.Array], rng: jax.Array | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean label-smoothed cross-entropy over `batch` {"image" [B, 8, 8, 1], "label" [B]}, plus any auxiliary
        loss the model sows (MoH's balance loss); deterministic. A model with `training_loss` computes its own
        (class docstring)."""
        if hasattr(model, "training_loss"):
            return model.training_loss(batch, rng, label_smoothing=self.label_smoothing)
        logits, auxiliary = call_with_auxiliary_loss(model, batch["image"])
        labels = batch["label"].astype(jnp.int32)
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), self.label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        metrics = {"accuracy": jnp.mean(jnp.argmax(logits, axis=-1) == labels)}
        if auxiliary is not None:
            metrics["auxiliary_loss"] = auxiliary
            loss = loss + auxiliary
        return loss, metrics

    # ---- Evaluation ----

    @functools.cached_property
    def _test_batches(self) -> tuple[list[np.ndarray], np.ndarray]:
        images, labels = self.data.arrays("test")
        pad = -len(images) % self.eval_batch_size  # whole batches: one compiled shape
        padded = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        return [padded[i : i + self.eval_batch_size] for i in range(0, len(padded), self.eval_batch_size)], labels

    def test_probabilities(self, model: ViT, shifts: int = 0) -> np.ndarray:
        """Class probabilities [n_test, classes] of every test image, averaged over +-`shifts` px rolls."""
        batches, labels = self._test_batches
        graphdef, state = nnx.split(model)
        probabilities = np.concatenate([np.asarray(_probabilities(graphdef, state, batch, shifts))
                                        for batch in batches])
        return probabilities[: len(labels)]  # the padding images are scored, then dropped here

    def test_outputs(self, model: nnx.Module) -> np.ndarray:
        """model(images) of every test image, [n_test, ...] (one compiled call per batch shape)."""
        batches, labels = self._test_batches
        graphdef, state = nnx.split(model)
        return np.concatenate([np.asarray(_outputs(graphdef, state, batch)) for batch in batches])[: len(labels)]

    def evaluate(self, model: ViT) -> dict[str, float]:
        """Test accuracy and mean test cross-entropy (nats) over the whole test split, each image seen once; with
        `test_time_shifts`, also the accuracy of the shift-averaged prediction (`test_accuracy_shift_averaged`).
        A model with `evaluation_metrics` scores its own outputs instead (class docstring)."""
        _, labels = self._test_batches
        if hasattr(model, "evaluation_metrics"):
            return model.evaluation_metrics(self.test_outputs(model), labels)
        probabilities = self.test_probabilities(model)
        nats = -np.log(np.maximum(probabilities[np.arange(len(labels)), labels], 1e-30))
        results = {"test_accuracy": float(np.mean(probabilities.argmax(-1) == labels)),
                   "test_loss": float(nats.mean())}
        if self.test_time_shifts:
            averaged = self.test_probabilities(model, self.test_time_shifts)
            results["test_accuracy_shift_averaged"] = float(np.mean(averaged.argmax(-1) == labels))
        return results

    def describe_evaluation(self, step: int, results: dict[str, float]) -> str:
        if "test_accuracy" not in results:  # a model's own evaluation_metrics
            return f"step {step}: " + "  ".join(f"{name} {value:.4f}" for name, value in results.items())
        averaged = ""
        if "test_accuracy_shift_averaged" in results:
            averaged = (f", {100 * results['test_accuracy_shift_averaged']:.1f}% averaged over +-"
                        f"{self.test_time_shifts} px shifts")
        return (f"step {step}: test accuracy {100 * results['test_accuracy']:.1f}%{averaged} (loss "
                f"{results['test_loss']:.3f})  |  logistic regression {100 * BASELINES['logistic_regression']:.1f}%"
                f"  RBF SVM {100 * BASELINES['rbf_svm']:.1f}%  (scikit-learn, same {len(self._test_batches[1])} "
                "test images)")

    # ---- End of training ----

    def finish(self, model: ViT, rng: jax.Array, workdir: str | None = None) -> None:
        print(self.report(model))

    def report(self, model: ViT) -> str:
        """Final test accuracy and the confusion matrix (rows: true digit, columns: predicted digit), of the
        shift-averaged prediction when `test_time_shifts` is set; a model with `evaluation_metrics`: those."""
        _, labels = self._test_batches
        if hasattr(model, "evaluation_metrics"):
            results = self.evaluate(model)
            return "\nFinal test metrics: " + "  ".join(f"{name} {value:.4f}" for name, value in results.items())
        predictions = self.test_probabilities(model, self.test_time_shifts).argmax(-1)
        confusion = np.zeros((digits.NUM_CLASSES, digits.NUM_CLASSES), np.int64)
        np.add.at(confusion, (labels, predictions), 1)
        how = f", averaged over +-{self.test_time_shifts} px shifts" if self.test_time_shifts else ""
        lines = [f"\nFinal test accuracy {100 * np.mean(predictions == labels):.2f}% "
                 f"({int(np.sum(predictions == labels))}/{len(labels)}{how}); confusion matrix (rows true, columns "
                 "predicted):",
                 "     " + " ".join(f"{c:>3}" for c in range(digits.NUM_CLASSES))]
        lines += [f"  {r:>2} " + " ".join(f"{n:>3}" for n in row) for r, row in enumerate(confusion)]
        return "\n".join(lines)


@functools.partial(jax.jit, static_argnums=(0,))
def _outputs(graphdef, state, images):
    return nnx.merge(graphdef, state)(images)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _probabilities(graphdef, state, images, shifts: int):
    model = nnx.merge(graphdef, state)
    if not shifts:
        return jax.nn.softmax(model(images), axis=-1)
    offsets = [(dy, dx) for dy in range(-shifts, shifts + 1) for dx in range(-shifts, shifts + 1)]
    rolled = jnp.concatenate([jnp.roll(images, offset, axis=(1, 2)) for offset in offsets])
    probabilities = jax.nn.softmax(model(rolled), axis=-1)
    return probabilities.reshape(len(offsets), images.shape[0], -1).mean(axis=0)
