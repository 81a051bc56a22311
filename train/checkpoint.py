"""Checkpoints with orbax: train state and grain iterator saved together, asynchronously, keeping the last N.

Restoring walks back from the newest checkpoint: one that cannot be read (truncated or corrupt files, missing
items, a step that does not match its directory) is reported, moved aside to `<directory>.corrupt/`, and the
previous one is tried. Moving it aside matters: otherwise the resumed run would later try to save the same step
into the broken directory.
"""

import logging
import pathlib
import shutil
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class IncompatibleCheckpointError(ValueError):
    """The workdir's checkpoints hold a different train state (another model size or optimizer): not corruption,
    so nothing is moved aside; the user picks another workdir or removes the checkpoints."""


class Checkpointer:
    """A thin policy layer over `ocp.CheckpointManager` for the trainer's {state, data_iter} pair."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, async_save: bool = True):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep (checkpoints to keep) must be an int >= 1, got {keep!r}")
        self.directory = pathlib.Path(directory).absolute()
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=self._options,
            item_names=("state", "data_iter"),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data_iter": grain.checkpoint.CheckpointHandler()},
        )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: dict[str, Any], data_iterator: grain.DatasetIterator) -> None:
        """Starts saving; returns once device arrays are copied, while files are written in the background."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data_iter=grain.checkpoint.CheckpointSave(data_iterator)),
            force=True,
        )

    def restore_latest(self, abstract_state: Any, data_iterator: grain.DatasetIterator,
                       report=print) -> tuple[dict[str, Any], int] | None:
        """Restores the newest readable checkpoint into a new state and `data_iterator` (in place).

        `abstract_state` gives shapes, dtypes and shardings (`jax.ShapeDtypeStruct` leaves). Returns (state, step), or
        None when there is no readable checkpoint. Unreadable checkpoints are reported through `report`.
        """
        for step in reversed(self.all_steps()):
            try:
                self._check_compatible(step, abstract_state)
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data_iter=grain.checkpoint.CheckpointRestore(data_iterator)),
                )
                state = restored["state"]
                stored_step = int(np.asarray(state["step"]))
                if stored_step != step:
                    raise ValueError(f"checkpoint directory says step {step} but its state says {stored_step}")
                return state, step
            except IncompatibleCheckpointError:
                raise
            except Exception as error:  # any read failure means "unusable": fall back to the previous checkpoint
                moved_to = self._move_aside(step)
                report(f"WARNING: checkpoint at step {step} is unreadable ({type(error).__name__}: "
                       f"{str(error).splitlines()[0][:300] if str(error) else ''}); moved it to {moved_to} and "
                       "trying the previous checkpoint")
        return None

    def restore_state(self, step: int, sharding: jax.sharding.Sharding) -> dict[str, Any]:
        """Reads only the "state" item of checkpoint `step` (no data iterator: export and inspection), every array
        placed with `sharding`; the target tree comes from the checkpoint's own metadata, so no optimizer is needed."""
        if step not in self.all_steps():
            raise ValueError(f"no checkpoint at step {step} in {self.directory}; available steps: {self.all_steps()}")
        target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                              self._manager.item_metadata(step)["state"])
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        return restored["state"]

    def _check_compatible(self, step: int, abstract_state: Any) -> None:
        """Compares the shapes and dtypes stored in the checkpoint's metadata with the state to restore into."""
        stored = jax.tree.leaves(self._manager.item_metadata(step)["state"])
        stored_leaves = sorted((tuple(leaf.shape), str(np.dtype(leaf.dtype))) for leaf in stored)
        expected = sorted((tuple(leaf.shape), str(np.dtype(leaf.dtype))) for leaf in jax.tree.leaves(abstract_state))
        if stored_leaves != expected:
            only_stored = sorted(set(stored_leaves) - set(expected))[:3]
            only_expected = sorted(set(expected) - set(stored_leaves))[:3]
            raise IncompatibleCheckpointError(
                f"the checkpoint at step {step} in {self.directory} holds a different train state ({len(stored_leaves)} "
                f"arrays, e.g. shapes {only_stored}) than this run builds ({len(expected)} arrays, e.g. {only_expected})"
                "; use another --workdir, or delete those checkpoints to start over")

    def _move_aside(self, step: int) -> pathlib.Path:
        source = self.directory / str(step)
        target_root = self.directory.with_name(self.directory.name + ".corrupt")
        target_root.mkdir(parents=True, exist_ok=True)
        target = target_root / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
        if source.exists():
            shutil.move(str(source), str(target))
        self._manager.close()
        self._manager = self._open()  # re-scan the directory so the moved step is forgotten
        return target

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(state: Any) -> Any:
    """Shape/dtype/sharding skeleton of `state`, the restore target that keeps the current shardings."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
