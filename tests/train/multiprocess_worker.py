"""One process of tests/train/test_multiprocess.py: trains the tiny byte LM with `train.trainer.train` and writes
what it saw (process index and count, device counts, per-step metrics) as JSON. `--mesh` sets the MeshConfig.

Run as a script in a fresh interpreter, since the device count is fixed when JAX starts: the parent sets
XLA_FLAGS=--xla_force_host_platform_device_count=N, JAX_PLATFORMS=cpu and, for a multi-process run,
ATTNX_COORDINATOR_ADDRESS / ATTNX_NUM_PROCESSES / ATTNX_PROCESS_ID, which `train.distributed.initialize` reads.
Not collected by pytest (no `test_` prefix); the test imports `tiny_task` from here so both sides build one task.
"""

import argparse
import json
import pathlib
import sys

# The same tiny shapes as tests/train/conftest.py: width 32, depth 1, sequence 16, global batch 8.
SEQ_LEN = 16
BATCH_SIZE = 8


def tiny_task(corpus_dir: pathlib.Path):
    from models.llm import LLMConfig
    from train.data.byte_lm import ByteLMData
    from train.data.sources import TextFiles
    from train.language_model import ByteLanguageModel

    data = ByteLMData(source=TextFiles(glob=str(pathlib.Path(corpus_dir) / "*.py")), seq_len=SEQ_LEN,
                      batch_size=BATCH_SIZE, validation_percent=20.0, validation_bytes=256, prefetch=1)
    model = LLMConfig(width=32, depth=1, num_heads=2, num_kv_heads=1, mlp_width=64)
    return ByteLanguageModel(model=model, data=data, eval_batch_size=8, sample_prompt="def ", sample_bytes=4)


class _TrainingOnly:
    """The task's training interface alone: evaluation and sampling compile programs of their own, and this test is
    about the training step (tests/train/test_language_model.py covers them)."""

    def __init__(self, task):
        self.build_model, self.train_iterator, self.loss_fn = task.build_model, task.train_iterator, task.loss_fn
        self.tokens_per_step = task.tokens_per_step


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mesh", default="-1,1,1,1", help="data,fsdp,tensor,sequence axis sizes (MeshConfig)")
    args = parser.parse_args(argv)

    from jax._src import xla_bridge

    from train import distributed, sharding, trainer

    # What train/__main__.py relies on: importing the trainer starts no JAX backend, so initialize can still run.
    assert not xla_bridge.backends_are_initialized(), "importing train.trainer initialised a JAX backend"
    joined = distributed.initialize()  # from the ATTNX_* environment the parent set (single process: none)
    assert distributed.initialize() == joined, "a second initialize with the same settings must be a no-op"

    import jax

    mesh = sharding.MeshConfig(**dict(zip(sharding.MESH_AXES, map(int, args.mesh.split(",")))))
    metrics: dict[int, dict[str, float]] = {}
    result = trainer.train(_TrainingOnly(tiny_task(pathlib.Path(args.corpus))), workdir=args.workdir,
                           steps=args.steps, mesh=mesh, progress_bar=False,
                           on_step=lambda step, values: metrics.__setitem__(step, dict(values)))
    report = {
        "joined": joined,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "final_step": result.final_step,
        "metrics": {str(step): values for step, values in sorted(metrics.items())},
    }
    pathlib.Path(args.out).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
