"""Multi-process training (issue 8, deliverable 6): two local CPU processes joined by `train.distributed.initialize`
train the tiny byte LM together and match one process holding the same four devices; plus the config, environment
and CLI paths of `initialize`.

Every JAX run here is a subprocess (tests/train/multiprocess_worker.py, or `python -m train`): the device count is
fixed when JAX starts, and this pytest process already runs with tests/conftest.py's 8 host devices.
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from attnx.testing.tolerances import assert_close
from train import __main__ as cli
from train import distributed
from train import metrics as metrics_lib
from train.data.byte_lm import ByteWindows

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
sys.path.insert(0, str(WORKER.parent))  # the worker is a script, not a package module
import multiprocess_worker  # noqa: E402

STEPS = 3
TIMEOUT_S = 150  # a hung collective or coordinator fails the test well inside 3 minutes, every process killed
# Set by the parent environment, these would steer the children (or a child's cluster detection) elsewhere.
_INHERITED = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
              "JAX_LOCAL_DEVICE_IDS", distributed.ENV_COORDINATOR_ADDRESS, distributed.ENV_NUM_PROCESSES,
              distributed.ENV_PROCESS_ID)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_env(local_devices: int, process: tuple[int, int, int] | None = None) -> dict[str, str]:
    """Environment of one child: `local_devices` host CPU devices; `process` = (port, count, index) to join a job."""
    env = {name: value for name, value in os.environ.items() if name not in _INHERITED}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    if os.environ.get("ATTNX_TEST_OPTIMIZE", "0") != "1":  # as tests/conftest.py: XLA passes dominate compile time
        env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    if process is not None:
        port, count, index = process
        env.update({distributed.ENV_COORDINATOR_ADDRESS: f"127.0.0.1:{port}",
                    distributed.ENV_NUM_PROCESSES: str(count), distributed.ENV_PROCESS_ID: str(index)})
    return env


def run_together(jobs: dict[str, tuple[list[str], dict[str, str]]], logs: pathlib.Path) -> None:
    """Starts every job at once (a job's processes must run together), waits for all, and on a failure or at
    TIMEOUT_S kills the ones still running and fails with each job's exit status and the tail of its output."""
    logs.mkdir(parents=True, exist_ok=True)
    running = {}
    for name, (command, env) in jobs.items():
        with open(logs / f"{name}.log", "w") as log:  # a file, not a pipe: a full pipe would block the child
            running[name] = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while True:
            status = [process.poll() for process in running.values()]  # poll every one: it sets returncode
            if None not in status or any(code not in (None, 0) for code in status) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for process in running.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    if any(p.returncode != 0 for p in running.values()):
        report = "\n".join(
            f"---- {name}: exit status {p.returncode} ----\n" + (logs / f"{name}.log").read_text()[-3000:]
            for name, p in running.items())
        pytest.fail(f"subprocesses failed (exit status -9: killed at {TIMEOUT_S} s, or when another failed):\n{report}")


def worker_command(corpus: pathlib.Path, workdir: pathlib.Path, out: pathlib.Path, mesh: str) -> list[str]:
    return [sys.executable, str(WORKER), "--corpus", str(corpus), "--workdir", str(workdir), "--out", str(out),
            "--steps", str(STEPS), f"--mesh={mesh}"]  # "=": a value may start with "-"


def train_two_ways(root: pathlib.Path, corpus: pathlib.Path, mesh: str) -> dict[str, dict]:
    """Two processes x 2 devices (one shared workdir `root/two`, as on a cluster's shared file system) and one
    process x 4 devices (`root/one`), same task and mesh, all three started at once; their reports by name."""
    port = free_port()
    jobs = {f"process{i}": (worker_command(corpus, root / "two", root / f"process{i}.json", mesh),
                            child_env(2, (port, 2, i))) for i in range(2)}
    jobs["single"] = (worker_command(corpus, root / "one", root / "single.json", mesh), child_env(4))
    run_together(jobs, root / "logs")
    return {name: json.loads((root / f"{name}.json").read_text()) for name in jobs}


def series(report: dict, name: str) -> np.ndarray:
    return np.asarray([report["metrics"][str(step)][name] for step in range(1, STEPS + 1)], np.float32)


def test_process_shares_union_to_the_single_process_batch(tmp_path, write_corpus):
    """The data half of the claim: at every step, process 0's and process 1's rows together are exactly the rows
    one process reads (as a multiset; their order on the devices differs, which a mean loss does not see), also
    across epoch boundaries (an odd window count, so the boundary falls inside a process's share) and reshuffles."""
    data = multiprocess_worker.tiny_task(write_corpus(tmp_path / "corpus", files=4)).data
    windows = len(ByteWindows(data.train_bytes, data.seq_len + 1, data.seq_len))
    assert windows % 2 == 1
    single = data.train_iterator(0, 1)
    shares = [data.train_iterator(index, 2) for index in range(2)]
    for _ in range(-(-5 * windows // (2 * data.batch_size))):  # two and a half epochs
        whole = next(single)["tokens"]
        parts = [next(share)["tokens"] for share in shares]
        assert [len(part) for part in parts] == [len(whole) // 2] * 2
        assert sorted(map(bytes, np.concatenate(parts))) == sorted(map(bytes, whole))


@pytest.mark.parametrize("mesh", [
    "-1,1,1,1",  # data parallel over the 4 devices of both processes, the train state replicated
    # Slow: three more interpreters (~55 CPU-s). FSDP across the processes x tensor parallel inside each: weights
    # and Adam moments split, so the checkpoint holds shards written by both processes.
    pytest.param("1,2,2,1", marks=pytest.mark.slow),
])
# Slow: two Python processes (~30 CPU-s); the mesh tests cover the sharded step in one process.
@pytest.mark.slow
def test_two_processes_train_together_like_one(tmp_path, corpus, mesh):
    reports = train_two_ways(tmp_path, corpus, mesh)
    workdir = tmp_path / "two"
    first, second, single = reports["process0"], reports["process1"], reports["single"]
    assert [(r["joined"], r["process_index"], r["process_count"], r["device_count"], r["local_device_count"])
            for r in (first, second, single)] == [(True, 0, 2, 4, 2), (True, 1, 2, 4, 2), (False, 0, 1, 4, 4)]
    assert first["final_step"] == second["final_step"] == single["final_step"] == STEPS
    # One computation over the global mesh: both processes read the same replicated scalars, bit for bit.
    assert first["metrics"] == second["metrics"]
    # Against one process: the same global batch, but its rows sit on other devices (process 0 holds windows
    # 0, 2, 4, 6 of the single run's 0..7) and the gradient all-reduce crosses processes, so sums run in another
    # order: float32 rounding of a few reductions (measured ~1e-7 relative), inside the table's float32 tolerance.
    assert_close(series(first, "loss"), series(single, "loss"), np.float32, "forward", what="per-step loss")
    assert_close(series(first, "grad_norm"), series(single, "grad_norm"), np.float32, "gradient",
                 what="per-step gradient norm")
    assert np.all(np.diff(series(first, "loss")) < 0)  # it trains: three finite, falling losses
    # Shared-workdir duties: one metrics writer (process 0), one checkpoint written by both processes together.
    assert [r["step"] for r in metrics_lib.read_metrics(workdir) if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert (workdir / "checkpoints" / str(STEPS)).is_dir()


# ---- initialize without starting a job: resolution, validation and the CLI's gin path ----


@pytest.fixture
def fresh_initialize(monkeypatch):
    """`initialize` as in a new process, with jax.distributed.initialize recorded instead of connecting."""
    calls = []
    monkeypatch.setattr(distributed, "_first_request", distributed._NOT_CALLED)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr("jax._src.xla_bridge.backends_are_initialized", lambda: False)
    for name in (distributed.ENV_COORDINATOR_ADDRESS, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_nothing_set_is_a_single_process_run(fresh_initialize):
    assert distributed.initialize() is False
    assert distributed.initialize(distributed.DistributedConfig()) is False  # same request again: no-op
    assert fresh_initialize == []


def test_config_fields_win_over_the_environment(fresh_initialize, monkeypatch):
    monkeypatch.setenv(distributed.ENV_COORDINATOR_ADDRESS, "10.0.0.1:1234")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "4")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "3")
    config = distributed.DistributedConfig(process_id=1, local_device_ids=[0], initialization_timeout=30)
    assert distributed.initialize(config) is True
    assert distributed.initialize(config) is True  # a second call with the same settings does nothing
    assert fresh_initialize == [dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=1,
                                     local_device_ids=[0], initialization_timeout=30,
                                     cluster_detection_method="deactivate")]
    with pytest.raises(RuntimeError, match="already called"):
        distributed.initialize(distributed.DistributedConfig(process_id=2))


def test_auto_leaves_the_unset_settings_to_jax_cluster_detection(fresh_initialize):
    assert distributed.initialize(distributed.DistributedConfig(auto=True, num_processes=8)) is True
    assert fresh_initialize == [dict(coordinator_address=None, num_processes=8, process_id=None,
                                     local_device_ids=None, initialization_timeout=300)]


def test_auto_without_a_cluster_says_what_is_missing(fresh_initialize, monkeypatch):
    def no_cluster(**kwargs):  # what jax.distributed.initialize raises when its detection finds nothing
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    with pytest.raises(ValueError, match="auto=True, but JAX's cluster detection .* found no job to take "
                                         "coordinator_address, process_id"):
        distributed.initialize(distributed.DistributedConfig(auto=True, num_processes=2))


def test_joining_after_the_backends_started_says_to_call_it_first(monkeypatch):
    monkeypatch.setattr(distributed, "_first_request", distributed._NOT_CALLED)
    jax.devices()  # this pytest process has started its backends
    config = distributed.DistributedConfig(coordinator_address="127.0.0.1:1", num_processes=2, process_id=0)
    with pytest.raises(RuntimeError, match="must be called before anything uses JAX devices"):
        distributed.initialize(config)
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("fields, message", [
    (dict(coordinator_address="10.0.0.1"), "coordinator_address must be 'host:port'"),
    (dict(coordinator_address="host:99999"), "got 'host:99999'"),
    (dict(num_processes=0), "DistributedConfig.num_processes must be an int >= 1, got 0"),
    (dict(process_id=-1), "DistributedConfig.process_id must be an int >= 0, got -1"),
    (dict(num_processes=2, process_id=2), "process_id=2 must be < num_processes=2"),
    (dict(local_device_ids=(0, 0)), "without repeats"),
    (dict(local_device_ids="0"), "local_device_ids must be a sequence of ints"),
    (dict(cpu_collectives="mpi"), "cpu_collectives='mpi'; allowed: ('gloo', None)"),
    (dict(initialization_timeout=0), "initialization_timeout must be an int >= 1"),
    (dict(auto="yes"), "auto must be True or False"),
])
def test_bad_config_values_are_named(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        distributed.DistributedConfig(**fields)


@pytest.mark.parametrize("environment, message", [
    ({distributed.ENV_NUM_PROCESSES: "two"}, "ATTNX_NUM_PROCESSES='two' must be an integer"),
    ({distributed.ENV_PROCESS_ID: "-1"}, "ATTNX_PROCESS_ID must be an int >= 0, got -1"),
    ({distributed.ENV_COORDINATOR_ADDRESS: "nohost"}, "ATTNX_COORDINATOR_ADDRESS must be 'host:port'"),
    ({distributed.ENV_NUM_PROCESSES: "2"}, "coordinator_address, process_id unset"),
    ({distributed.ENV_COORDINATOR_ADDRESS: "h:1", distributed.ENV_NUM_PROCESSES: "2", distributed.ENV_PROCESS_ID: "5"},
     "process_id=5 must be < num_processes=2"),
])
def test_bad_environment_is_named(fresh_initialize, monkeypatch, environment, message):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        distributed.initialize()
    assert fresh_initialize == []


def distributed_gin_file(directory: pathlib.Path, **fields) -> pathlib.Path:
    lines = ["from __gin__ import dynamic_registration", "from train import distributed", "",
             "distributed.DistributedConfig:"] + [f"  {name} = {value!r}" for name, value in fields.items()]
    path = directory / "distributed.gin"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("fields, message", [
    (dict(num_processes=2), "coordinator_address, process_id unset"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=-1), "process_id must be an int >= 0, got -1"),
])
def test_cli_reports_bad_distributed_bindings(fresh_initialize, tmp_path, capsys, fields, message):
    import gin

    gin_file = distributed_gin_file(tmp_path, **fields)
    try:
        status = cli.main(["--gin_file", "configs/quickstart.gin", "--gin_file", str(gin_file),
                           "--workdir", str(tmp_path / "run")])
    finally:
        gin.clear_config()
    assert status == 2
    error = capsys.readouterr().err
    assert error.startswith("error:") and message in error
    assert fresh_initialize == [] and not (tmp_path / "run").exists()


def cli_command(corpus: pathlib.Path, workdir: pathlib.Path, gin_files=(), bindings=()) -> list[str]:
    tiny = ["WIDTH = 32", "DEPTH = 1", "NUM_HEADS = 2", "NUM_KV_HEADS = 1", "SEQ_LEN = 16", "BATCH_SIZE = 8",
            f"STEPS = {STEPS}", "llm.LLMConfig.mlp_width = 64", "byte_lm.ByteLMData.validation_bytes = 256",
            "language_model.ByteLanguageModel.sample_bytes = 4", "trainer.train.progress_bar = False",
            f"TEXT_GLOB = '{corpus}/*.py'", *bindings]
    files = ["configs/quickstart.gin", *map(str, gin_files)]
    return [sys.executable, "-m", "train", *(a for f in files for a in ("--gin_file", f)),
            *(a for b in tiny for a in ("--gin_bindings", b)), "--workdir", str(workdir)]


# Slow: three more fresh interpreters that import, compile, evaluate and sample (~70 CPU-s on 2 cores); the
# default test above already trains two processes together through the same trainer and initialize.
@pytest.mark.slow
def test_cli_two_processes_from_gin_bindings_match_one(tmp_path, corpus):
    gin_file = distributed_gin_file(tmp_path, coordinator_address=f"127.0.0.1:{free_port()}", num_processes=2)
    jobs = {f"process{i}": (cli_command(corpus, tmp_path / "two", [gin_file],
                                        [f"distributed.DistributedConfig.process_id = {i}"]), child_env(2))
            for i in range(2)}
    jobs["single"] = (cli_command(corpus, tmp_path / "one"), child_env(4))
    run_together(jobs, tmp_path / "logs")

    def losses(workdir):
        return np.asarray([r["loss"] for r in metrics_lib.read_metrics(workdir) if r["kind"] == "train"], np.float32)

    assert len(losses(tmp_path / "two")) == STEPS  # process 0 alone writes the metrics of the shared workdir
    assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), np.float32, "forward", what="per-step loss")
    resolved = (tmp_path / "two" / "config.gin").read_text()
    assert "distributed.DistributedConfig.num_processes = 2" in resolved
    assert "distributed.DistributedConfig.process_id = 0" in resolved  # written by process 0 only
