"""The trainer runs the loss in NNX training mode and evaluates in evaluation mode (`model.train()` /
`model.eval()`), the switch mechanisms with train-time randomness rely on (LARA's sampling, dropout)."""

import grain
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train import trainer


class ModeProbe(nnx.Module):
    """Outputs its weight, doubled in training mode: the loss sees 2w, evaluation sees w."""

    def __init__(self, rngs: nnx.Rngs):
        del rngs
        self.w = nnx.Param(jnp.ones(()))
        self.deterministic = True

    def __call__(self):
        return self.w[...] * (1.0 if self.deterministic else 2.0)


class ModeTask:
    tokens_per_step = 1

    def __init__(self):
        self.seen_in_evaluation = []

    def build_model(self, rngs):
        return ModeProbe(rngs)

    def train_iterator(self, process_index, process_count):
        del process_index, process_count
        batch = {"x": np.zeros((8,), np.float32)}  # one row per forced host device
        return iter(grain.MapDataset.range(1).map(lambda _: batch).repeat().to_iter_dataset())

    def loss_fn(self, model, batch, rng):
        del batch, rng
        out = model()
        return out, {"output": out}

    def evaluate(self, model):
        self.seen_in_evaluation.append(model.deterministic)
        return {"output": float(model())}


def test_loss_runs_in_training_mode_and_evaluation_in_evaluation_mode(tmp_path):
    task = ModeTask()
    result = trainer.train(task, workdir=str(tmp_path), steps=1, progress_bar=False, eval_every=0,
                           checkpoint_every=1)
    # One step from w = 1: the loss saw the training-mode output 2w = 2.
    assert result.losses[1] == 2.0
    assert task.seen_in_evaluation == [True]
    assert result.evaluations[1]["output"] == float(np.asarray(result.params["w"][...]))
