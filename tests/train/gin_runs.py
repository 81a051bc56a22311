"""One training step of a family's gin experiment, as `python -m train` runs it, for the tests that need a real
workdir (export, analyze): resolved config.gin in the workdir, a checkpoint at step 1, no evaluation or sampling
(the stop event is set beforehand)."""

import pathlib
import threading

import gin

from train import gin_config, trainer


def train_one_step(files: list[str], bindings: list[str], workdir: pathlib.Path,
                   corpus: pathlib.Path | None = None) -> pathlib.Path:
    """Trains the run of gin `files` + `bindings` (plus STEPS = 2, and TEXT_GLOB over `corpus` for the byte LM) for
    one step into `workdir` and returns it; gin is left cleared."""
    bindings = bindings + ["STEPS = 2"] + ([f"TEXT_GLOB = '{corpus}/*.py'"] if corpus is not None else [])
    try:
        gin_config.parse(files, bindings)
        gin_config.write_resolved_config(workdir)
        stop = threading.Event()
        stop.set()
        result = gin_config.configured(trainer.train)(
            workdir=str(workdir), checkpoint_every=1, progress_bar=False, async_checkpoints=False, stop_event=stop)
    finally:
        gin.clear_config()
    assert result.final_step == 1 and result.interrupted
    return workdir
