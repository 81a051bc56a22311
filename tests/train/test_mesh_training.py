"""The real trainer on the suite's 8 fake CPU devices: every mesh shape trains the same model to the same losses.

Each run trains a tiny LLM (4 query heads, 2 key/value heads, so the tensor axis really splits heads, MLP width and
vocabulary) for a few steps from the same seed on the same data; the attention is `ring`, which is plain attention
on meshes without a sequence axis and ring attention over it otherwise. The single-device run is the reference.
"""

import dataclasses
import threading

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from models.llm import LLMConfig
from train import sharding, trainer

STEPS = 3
MODEL = LLMConfig(width=32, depth=1, num_heads=4, num_kv_heads=2, mlp_width=64, attention="ring",
                  tie_embeddings=False)
MESHES = {  # (data, fsdp, tensor, sequence), as in issue 8
    "data8": sharding.MeshConfig(data=8),
    "data2_fsdp4": sharding.MeshConfig(data=2, fsdp=4),
    "data2_fsdp2_tensor2": sharding.MeshConfig(data=2, fsdp=2, tensor=2),
    "fsdp2_tensor2_sequence2": sharding.MeshConfig(data=1, fsdp=2, tensor=2, sequence=2),
}
# The data x fsdp x tensor run also accumulates gradients over 2 microbatches (4 rows each, one per batch shard): the
# same update as the whole batch, so the same losses.
OPTIONS = {"data2_fsdp2_tensor2": dict(gradient_accumulation=2)}
# Losses after a few AdamW steps: the sharded runs sum gradients in another order (per-device partial sums, then
# all-reduce), so float32 rounding differs at ~1e-6 per step and the updates carry it on; the gradient tolerance of
# the table (1e-4) bounds that with room.
RTOL = ATOL = 1e-4


@dataclasses.dataclass
class TrainOnly:
    """The task without evaluation or finish: these tests compare training only, and skip those compiles."""

    task: object

    def __getattr__(self, name):
        if name in ("evaluate", "finish", "describe_evaluation"):
            raise AttributeError(name)
        return getattr(self.task, name)


@pytest.fixture(scope="module")
def task(corpus, tiny_task):
    return TrainOnly(dataclasses.replace(tiny_task(corpus), model=MODEL))


def run(task, workdir, mesh, checkpoint_every=0, **kwargs):
    """Without checkpoints unless asked: saving sharded arrays compiles a slicing program per array, which would
    double these tests' time."""
    return trainer.train(task, workdir=str(workdir), steps=STEPS, mesh=mesh, progress_bar=False,
                         checkpoint_every=checkpoint_every, async_checkpoints=False, **kwargs)


@pytest.fixture(scope="module")
def single_device(task, tmp_path_factory):
    return run(task, tmp_path_factory.mktemp("single"), sharding.MeshConfig(data=1))


@pytest.fixture(scope="module")
def mesh_runs(task, tmp_path_factory):
    """One run per mesh shape, shared by the tests below (each run compiles its own sharded step)."""
    runs = {}

    def get(name):
        if name not in runs:
            workdir = tmp_path_factory.mktemp(name)
            runs[name] = workdir, run(task, workdir, MESHES[name], **OPTIONS.get(name, {}))
        return runs[name]

    return get


@pytest.mark.parametrize("name", list(MESHES))
def test_every_mesh_shape_trains_to_the_single_device_losses(single_device, mesh_runs, name):
    _, result = mesh_runs(name)
    expected = [single_device.losses[step] for step in range(1, STEPS + 1)]
    actual = [result.losses[step] for step in range(1, STEPS + 1)]
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL, err_msg=f"mesh {name}")
    assert result.compilations == 1, f"mesh {name}: the train step compiled {result.compilations} times"
    for got, want in zip(jax.tree.leaves(result.params), jax.tree.leaves(single_device.params), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=RTOL, atol=ATOL)


def test_weights_and_moments_are_split_as_the_rules_say(mesh_runs):
    workdir, result = mesh_runs("data2_fsdp2_tensor2")
    block = result.params["blocks"][0]
    assert block["attention"]["query_dnh"][...].sharding.spec == P("fsdp", "tensor", None)
    assert block["attention"]["out_nhd"][...].sharding.spec == P("tensor", None, "fsdp")
    assert block["mlp"]["down_fd"][...].sharding.spec == P("tensor", "fsdp")
    # each device holds a quarter of the query projection (D over fsdp=2, N over tensor=2)
    shard = block["attention"]["query_dnh"][...].addressable_shards[0].data
    assert shard.shape == (16, 2, 8)
    listing = (workdir / "sharding.txt").read_text()
    assert "query_dnh" in listing and "mu" in listing  # the Adam moments follow their parameters


def test_checkpoint_saved_on_one_mesh_resumes_on_another(task, single_device, tmp_path):
    """Stopped after 2 steps on data=8 (replicated weights), resumed on data=2 x fsdp=4 (weights split): the last
    step's loss is the uninterrupted one."""
    stop = threading.Event()
    first = run(task, tmp_path, MESHES["data8"], checkpoint_every=STEPS, stop_event=stop,
                on_step=lambda step, _: stop.set() if step == 2 else None)
    assert first.interrupted and first.final_step == 2
    resumed = run(task, tmp_path, MESHES["data2_fsdp4"], checkpoint_every=STEPS)
    assert resumed.start_step == 2
    np.testing.assert_allclose(resumed.losses[STEPS], single_device.losses[STEPS], rtol=RTOL, atol=ATOL)
    assert resumed.params["blocks"][0]["mlp"]["down_fd"][...].sharding.spec == P(None, "fsdp")


def test_bad_mesh_configs_name_the_problem():
    with pytest.raises(ValueError, match="only one axis may be -1"):
        sharding.MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="MeshConfig.tensor must be an int >= 1"):
        sharding.MeshConfig(tensor=0)
    with pytest.raises(ValueError, match="does not divide 8"):
        sharding.make_mesh(sharding.MeshConfig(fsdp=3))
