"""Device mesh, the logical-axis rules, and where every array of a run lives. One code path for 1 CPU, 8 fake CPU
devices, a GPU, or many hosts.

The mesh has the four named axes of ARCHITECTURE §6:
    data      batches split; everything else replicated (data parallelism)
    fsdp      batches split too, and every weight's model width D (so the optimizer state with it): ZeRO-3 /
              FSDP; XLA gathers a weight where a matmul needs it
    tensor    Megatron-style tensor parallelism: heads (N, K) and the MLP width F split, so attention and MLP are
              column-then-row parallel; the vocabulary V of the embedding and logits too
    sequence  the tokens T of activations split: ring attention (`attention = 'ring'`) passes keys and values
              around this axis; other mechanisms see the sequence gathered by XLA where they need all of it

Which letter goes where is `LOGICAL_AXIS_RULES`, the one table (ARCHITECTURE §3): weights are matched by the axis
letters ending their names (`query_dnh`), activations by the letters the models pass to
`models.layers.sharding.constrain` (`"btd"`). The resolution rules (indivisible dims replicated, each mesh axis
once per array) are in models/layers/sharding.py.
"""

import contextlib
import dataclasses
from typing import Any, Iterator

import flax.core.spmd
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from models.layers.sharding import axis_letters, partition_spec

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("data", "fsdp")

# (logical name, mesh axes). "w_<letter>": an axis of a weight (and of its optimizer moments); "act_<letter>": an axis
# of an activation. Letters without a rule (H head dim, C channels, P patch pixels, E experts, digits) are replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("w_d", "fsdp"),          # model width of every weight: FSDP
    ("w_n", "tensor"),        # query heads: column-parallel Q, row-parallel output projection
    ("w_k", "tensor"),        # key/value heads
    ("w_f", "tensor"),        # MLP width: column-parallel up, row-parallel down
    ("w_v", "tensor"),        # vocabulary rows of embeddings and the unembedding
    ("act_b", BATCH_AXES),    # the batch over data x fsdp
    ("act_t", "sequence"),    # tokens (query positions)
    ("act_s", "sequence"),    # key/value positions
    ("act_n", "tensor"),
    ("act_k", "tensor"),
    ("act_f", "tensor"),
    ("act_v", "tensor"),      # logits over the vocabulary
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1, "all devices the others leave" (default: data)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1

    def __post_init__(self):
        sizes = dataclasses.asdict(self)
        for name, size in sizes.items():
            if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
                raise ValueError(f"MeshConfig.{name} must be an int >= 1, or -1 for the remaining devices; "
                                 f"got {size!r}")
        filled = [name for name, size in sizes.items() if size == -1]
        if len(filled) > 1:
            raise ValueError(f"MeshConfig: only one axis may be -1 (fill the remaining devices), got {filled}")

    def shape(self, device_count: int) -> tuple[int, ...]:
        """The four axis sizes on `device_count` devices, with -1 filled in."""
        sizes = [getattr(self, name) for name in MESH_AXES]
        known = int(np.prod([size for size in sizes if size != -1]))
        if -1 in sizes:
            if device_count % known:
                raise ValueError(f"mesh {self._describe()} cannot fill {device_count} devices: the fixed axes "
                                 f"multiply to {known}, which does not divide {device_count}")
            sizes[sizes.index(-1)] = device_count // known
        elif known != device_count:
            raise ValueError(f"mesh {self._describe()} needs {known} devices, found {device_count}; set one axis "
                             "to -1 to use all of them")
        return tuple(sizes)

    def _describe(self) -> str:
        return "(" + ", ".join(f"{name}={getattr(self, name)}" for name in MESH_AXES) + ")"


def make_mesh(config: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    """A mesh over `devices` (default: all, every process's) with axes MESH_AXES, GSPMD-style `Auto` axis types.

    `jax.make_mesh` orders the devices by their physical topology (ICI rings on TPU, NVLink islands on GPU) so that
    the inner axes (tensor, sequence) get the fastest links.
    """
    all_devices = devices is None
    devices = list(jax.devices() if devices is None else devices)
    wanted = int(np.prod([getattr(config, name) for name in MESH_AXES]))
    if all_devices and wanted > 0 and wanted < len(devices):
        # A fixed mesh smaller than the machine (e.g. data=1 on 8 devices: a single-device baseline) runs on the
        # first devices; across processes that would leave some hosts without devices, so it is refused there.
        if jax.process_count() > 1:
            raise ValueError(f"mesh {config._describe()} uses {wanted} of the {len(devices)} devices of a "
                             f"{jax.process_count()}-process job; every process must take part: set one axis to -1")
        devices = devices[:wanted]
    shape = config.shape(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data x fsdp; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def put_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into one global array sharded along the batch axis."""
    sharding = batch_sharding(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, value) for name, value in local_batch.items()}


def weight_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec of a weight (or an optimizer moment of it) called `name`; replicated when its name
    carries no axis letters."""
    letters = axis_letters(name, len(shape))
    if letters is None:
        return P()
    return partition_spec(letters, shape, "w", dict(LOGICAL_AXIS_RULES), dict(mesh.shape))


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings for every leaf of a pytree of arrays (or ShapeDtypeStructs): the train state's params and
    optimizer moments by the name of their variable (the last string key on their path, e.g. `query_dnh`), any
    other leaf (step counters, RNG, scalars) replicated. The optimizer moments mirror the parameter tree, so each
    moment lands where its parameter does."""

    def sharding_of(path, leaf):
        names = [entry.key for entry in path if isinstance(getattr(entry, "key", None), str)]
        names = [name for name in names if name != "value"]
        shape = tuple(getattr(leaf, "shape", ()))
        if not names or not shape:
            return replicated(mesh)
        return NamedSharding(mesh, weight_spec(names[-1], shape, mesh))

    return jax.tree_util.tree_map_with_path(sharding_of, state)


def describe_shardings(state: Any, shardings: Any) -> list[str]:
    """One line per parameter that is split, `path shape -> spec`, for the run's log."""
    lines = []
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(shardings)):
        if any(axis is not None for axis in sharding.spec):
            lines.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} -> {sharding.spec}")
    return lines


@contextlib.contextmanager
def activation_rules(mesh: Mesh) -> Iterator[None]:
    """The mesh and the rules in context while a step is traced, so the models' `constrain` calls and the `ring`
    mechanism see them; outside it the models run unconstrained."""
    with jax.set_mesh(mesh), flax.core.spmd.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield
