"""Device mesh and data placement. One code path for 1 CPU, 8 fake CPU devices, a GPU, or many hosts.

The mesh always has the four named axes of ARCHITECTURE §6 (`data`, `fsdp`, `tensor`, `sequence`). This slice
implements data parallelism: the batch is split over `data` x `fsdp` and the train state is replicated. Parameter
and activation sharding rules (fsdp/tensor/sequence > 1) come with the larger models; until then asking for them is
an error rather than a silently replicated run.
"""

import dataclasses

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; -1 on `data` means "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1

    def __post_init__(self):
        for name in ("fsdp", "tensor", "sequence"):
            if getattr(self, name) != 1:
                raise NotImplementedError(
                    f"MeshConfig.{name}={getattr(self, name)}: only data parallelism is implemented so far "
                    "(fsdp, tensor and sequence must be 1)")
        if self.data != -1 and self.data < 1:
            raise ValueError(f"MeshConfig.data must be -1 (all devices) or >= 1, got {self.data!r}")


def make_mesh(config: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    """A mesh over `devices` (default: all) with axes MESH_AXES, using GSPMD-style `Auto` axis types."""
    devices = list(jax.devices() if devices is None else devices)
    data = len(devices) if config.data == -1 else config.data
    shape = (data, config.fsdp, config.tensor, config.sequence)
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {dict(zip(MESH_AXES, shape))} needs {np.prod(shape)} devices, "
                         f"found {len(devices)}")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data x fsdp; the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def put_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into one global array sharded along the batch axis."""
    sharding = batch_sharding(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, value) for name, value in local_batch.items()}
