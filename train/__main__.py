"""`python -m train --gin_file=FILE [--gin_file=...] [--gin_bindings=BINDING ...] [--workdir=DIR]`.

The gin files configure `train.trainer.train` (see configs/quickstart.gin); bindings override them; the resolved
configuration is written to `<workdir>/config.gin` before training starts. Exit status: 0 when training finished or
was stopped by SIGTERM with a checkpoint, 1 on a non-finite loss, 2 on a configuration error.
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
    from train import trainer

    try:
        gin_config.parse(args.gin_file, args.gin_bindings)
        run = gin_config.configured(trainer.train)
        config_path = gin_config.write_resolved_config(args.workdir)
    except gin_config.GinConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Resolved config written to {config_path}")
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


if __name__ == "__main__":
    sys.exit(main())
