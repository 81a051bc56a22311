"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from a config, the environment, or the cluster.

Every process of a multi-host job runs the same program; before anything touches a JAX device, each one calls
`initialize`, which connects it to the coordinator (process 0) so that `jax.devices()` lists the devices of all
processes and one `jit` over a global mesh spans them (ARCHITECTURE §6). The trainer needs nothing else: each
process feeds its share of the batch (`task.train_iterator(jax.process_index(), jax.process_count())`).

Where the settings come from, first match wins:
    1. fields of `DistributedConfig` (from Python or gin: `distributed.DistributedConfig.num_processes = 2`);
    2. the environment: ATTNX_COORDINATOR_ADDRESS ("host:port" of process 0), ATTNX_NUM_PROCESSES, ATTNX_PROCESS_ID;
    3. with `auto=True` only, JAX's own cluster detection (SLURM, Open MPI, Cloud TPU pods, GKE/Kubernetes, ...):
       whatever 1 and 2 left unset is asked of `jax.distributed.initialize`, which reads the cluster's environment.
Nothing set and `auto=False` (the default) means one process: `initialize` does nothing, so single-process runs never
try to connect anywhere. Without `auto`, the three settings must come together and JAX's detection is switched off,
so a run does exactly what its config says even inside a SLURM allocation.

On CPU, cross-process collectives (the all-reduce of data-parallel gradients) need an implementation: `initialize`
sets `jax_cpu_collectives_implementation` to `cpu_collectives` ("gloo", TCP, what JAX 0.10 also defaults to) before
connecting. The flag only concerns JAX's CPU client, so it is set whatever the accelerator.
"""

import dataclasses
import os
from typing import Literal

import jax

ENV_COORDINATOR_ADDRESS = "ATTNX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "ATTNX_NUM_PROCESSES"
ENV_PROCESS_ID = "ATTNX_PROCESS_ID"
CPU_COLLECTIVES = ("gloo", None)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process job; every field may be left unset (see the module docstring).

    coordinator_address: "host:port" of process 0's coordinator service, the same string in every process.
    num_processes, process_id: the job's process count and this process's index in [0, num_processes).
    local_device_ids: the local accelerators this process drives (e.g. (0,) for one GPU per process); None = all.
    cpu_collectives: cross-process collectives on CPU ("gloo"), or None to leave JAX's setting alone.
    initialization_timeout: seconds to wait for every process to reach the coordinator before failing.
    auto: let JAX detect what is unset from the cluster (SLURM, Open MPI, TPU pods, ...).
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    cpu_collectives: Literal["gloo"] | None = "gloo"
    initialization_timeout: int = 300
    auto: bool = False

    def __post_init__(self):
        if self.coordinator_address is not None:
            _check_address("DistributedConfig.coordinator_address", self.coordinator_address)
        if self.num_processes is not None:
            _check_int("DistributedConfig.num_processes", self.num_processes, minimum=1)
        if self.process_id is not None:
            _check_int("DistributedConfig.process_id", self.process_id, minimum=0)
        if None not in (self.num_processes, self.process_id) and self.process_id >= self.num_processes:
            raise ValueError(f"DistributedConfig.process_id={self.process_id} must be < num_processes="
                             f"{self.num_processes} (process ids are 0 .. num_processes - 1)")
        if self.local_device_ids is not None:
            ids = self.local_device_ids
            if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
                raise ValueError(f"DistributedConfig.local_device_ids must be a sequence of ints >= 0 or None, "
                                 f"got {ids!r}")
            ids = tuple(ids)  # gin and YAML hand over lists; the frozen config keeps a hashable tuple
            for device_id in ids:
                _check_int("DistributedConfig.local_device_ids entry", device_id, minimum=0)
            if not ids or len(set(ids)) != len(ids):
                raise ValueError(f"DistributedConfig.local_device_ids must be non-empty and without repeats, "
                                 f"got {self.local_device_ids!r}")
            object.__setattr__(self, "local_device_ids", ids)
        if self.cpu_collectives not in CPU_COLLECTIVES:
            raise ValueError(f"DistributedConfig.cpu_collectives={self.cpu_collectives!r}; allowed: {CPU_COLLECTIVES}")
        _check_int("DistributedConfig.initialization_timeout", self.initialization_timeout, minimum=1)
        if not isinstance(self.auto, bool):
            raise ValueError(f"DistributedConfig.auto must be True or False, got {self.auto!r}")


_NOT_CALLED = object()
# The resolved request of the first `initialize` call in this process (None: a single-process run).
_first_request: dict | None | object = _NOT_CALLED


def initialize(config: DistributedConfig | None = None) -> bool:
    """Joins the multi-process job described by `config`, the environment or the cluster; returns whether this
    process is part of a multi-process job (False: a single-process run, nothing was done).

    Call it once, first thing, before any JAX computation or `jax.devices()`. A second call with the same settings
    does nothing; one with different settings raises, as does joining a job after JAX's backends were initialised.
    If the program already called `jax.distributed.initialize` itself, this does nothing.
    """
    global _first_request
    config = DistributedConfig() if config is None else config
    if not isinstance(config, DistributedConfig):
        raise ValueError(f"initialize: config must be a DistributedConfig or None, got {type(config).__name__}")
    request = _resolve(config)
    if _first_request is not _NOT_CALLED:
        if request != _first_request:
            raise RuntimeError(f"train.distributed.initialize was already called with {_first_request}; a second "
                               f"call asks for {request}. Call it once, at the start of the program.")
        return _first_request is not None or jax.distributed.is_initialized()
    if request is None or jax.distributed.is_initialized():
        _first_request = request
        return jax.distributed.is_initialized()
    # Private, but the only way to say "too late" before a half-done initialisation; JAX itself checks it the same
    # way inside jax.distributed.initialize (jax 0.4 .. 0.10).
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "train.distributed.initialize must be called before anything uses JAX devices (jax.devices(), "
            "jax.process_index(), any computation or array creation); JAX's backends are already initialised. "
            "Call it first, right after parsing the configuration.")
    if config.cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", config.cpu_collectives)
    try:
        jax.distributed.initialize(**request)
    except ValueError as error:  # with auto: JAX found no cluster to fill in what is unset
        if not config.auto:
            raise
        unset = [name for name in ("coordinator_address", "num_processes", "process_id") if request[name] is None]
        raise ValueError(f"DistributedConfig.auto=True, but JAX's cluster detection (SLURM, Open MPI, Cloud TPU, "
                         f"Kubernetes, ...) found no job to take {', '.join(unset) or 'the settings'} from ({error}); "
                         f"set them in DistributedConfig or as {ENV_COORDINATOR_ADDRESS}, {ENV_NUM_PROCESSES}, "
                         f"{ENV_PROCESS_ID}") from error
    _first_request = request
    return True


def _resolve(config: DistributedConfig) -> dict | None:
    """Keyword arguments for `jax.distributed.initialize`, or None for a single-process run."""
    address = config.coordinator_address or _from_env(ENV_COORDINATOR_ADDRESS)
    num_processes = config.num_processes if config.num_processes is not None else _from_env(ENV_NUM_PROCESSES)
    process_id = config.process_id if config.process_id is not None else _from_env(ENV_PROCESS_ID)
    settings = {"coordinator_address": address, "num_processes": num_processes, "process_id": process_id}
    common = {"local_device_ids": list(config.local_device_ids) if config.local_device_ids else None,
              "initialization_timeout": config.initialization_timeout}
    unset = [name for name, value in settings.items() if value is None]
    if config.auto:
        return {**settings, **common}  # JAX fills what is unset from the cluster, or says it cannot
    if len(unset) == len(settings):
        return None
    if unset:
        raise ValueError(
            f"a multi-process run needs coordinator_address, num_processes and process_id together; "
            f"{', '.join(unset)} unset (given: { {k: v for k, v in settings.items() if v is not None} }). Set them in "
            f"DistributedConfig or as {ENV_COORDINATOR_ADDRESS}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}, or set "
            "DistributedConfig.auto=True to let JAX detect them from the cluster (SLURM, Open MPI, TPU pods)")
    if process_id >= num_processes:
        raise ValueError(f"process_id={process_id} must be < num_processes={num_processes} "
                         f"(from DistributedConfig or {ENV_PROCESS_ID}/{ENV_NUM_PROCESSES})")
    # Explicit settings are taken as they are: JAX's cluster detection would otherwise still fill local_device_ids.
    return {**settings, **common, "cluster_detection_method": "deactivate"}


def _from_env(name: str):
    """The environment variable `name`, checked like the config field it stands for; None when unset or empty."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if name == ENV_COORDINATOR_ADDRESS:
        _check_address(name, value)
        return value
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None
    _check_int(name, number, minimum=1 if name == ENV_NUM_PROCESSES else 0)
    return number


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_address(name: str, value) -> None:
    """'host:port' with a port in 1..65535 (IPv6 hosts in brackets, "[::1]:1234", as gRPC expects)."""
    host, _, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{name} must be 'host:port' with a port in 1..65535 (e.g. '10.0.0.1:1234'), got {value!r}")
