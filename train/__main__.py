"""`python -m train --gin_file=FILE [--gin_file=...] [--gin_bindings=BINDING ...] [--workdir=DIR]`.

The gin files configure `train.trainer.train` (see configs/quickstart.gin); bindings override them; the resolved
configuration is written to `<workdir>/config.gin` before training starts. Exit status: 0 when training finished or
was stopped by SIGTERM with a checkpoint, 1 on a non-finite loss, 2 on a configuration error.

Multi-process (multi-host) runs: every process runs the same command. Right after the gin files are parsed, and before
anything touches a JAX device, `train.distributed.initialize` joins the job described by the fields of
`distributed.DistributedConfig` bound in a gin file (one that imports `from train import distributed`), else by the
environment (ATTNX_COORDINATOR_ADDRESS, ATTNX_NUM_PROCESSES, ATTNX_PROCESS_ID); with none of them it is a
single-process run. `distributed.DistributedConfig.auto = True` lets JAX detect the job on SLURM, Open MPI and TPU
pods. Only process 0 writes the resolved config.
"""

import argparse
import sys
import time

from train import gin_config

DEFAULT_WORKDIR = "workdir"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n\n")[1])
    parser.add_argument("--gin_file", action="append", default=[], required=True,
                        help="gin file to parse (repeatable; later files override earlier ones)")
    parser.add_argument("--gin_bindings", action="append", default=[],
                        help="one gin binding, e.g. \"trainer.train.steps = 10\" (repeatable; wins over files)")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR,
                        help=f"where checkpoints, metrics and the resolved config go (default: ./{DEFAULT_WORKDIR}); "
                             "an existing workdir is resumed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    began = time.perf_counter()
    # Imported after argument parsing so that `--help` and argument errors are instant.
    import jax

    from train import distributed, trainer  # neither initialises a JAX backend on import (checked by a test)

    try:
        gin_config.parse(args.gin_file, args.gin_bindings)
        run = gin_config.configured(trainer.train)
        # First, before any device is touched: a multi-process job must be joined before JAX's backends start.
        distributed.initialize(_distributed_config())
    except ValueError as error:  # gin errors and bad distributed settings (from gin or the environment)
        print(f"error: {error}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:  # one writer for the shared workdir
        print(f"Resolved config written to {gin_config.write_resolved_config(args.workdir)}")
    try:
        result = run(workdir=args.workdir)
    except trainer.NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # bad values in the config, caught at construction with a message naming them
        print(f"error: {error}", file=sys.stderr)
        return 2
    status = "stopped (resumable)" if result.interrupted else "finished"
    print(f"Training {status} at step {result.final_step}; wall time {time.perf_counter() - began:.1f} s; "
          f"outputs in {args.workdir}")
    return 0


def _distributed_config():
    """The gin-bound `distributed.DistributedConfig()`, or None when no gin file mentions it."""
    import gin

    from train import distributed

    try:
        configurable = gin.get_configurable(distributed.DistributedConfig)
    except ValueError:  # not in gin's registry: no file imported train.distributed and bound it
        return None
    return configurable()


if __name__ == "__main__":
    sys.exit(main())
