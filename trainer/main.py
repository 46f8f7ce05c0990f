"""Entry point: `python -m trainer.main [--config FILE] [key=value ...]`, alone or under torchrun."""
import sys

from common.errors import CheckpointError, ConfigError, DataError, Diverged, UserInputError
from trainer import distributed, precision
from trainer.config import check_paths, load_config, parse_args, to_yaml

EXIT_USAGE = 2


def _where(e: Exception) -> str:
    rank = getattr(e, "failed_rank", None)
    return f" (on rank {rank})" if rank is not None else ""


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        precision.check_device(cfg.train.precision)
        if not args.print_config:
            check_paths(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0

    from trainer.trainer import Trainer  # after validation: bad input fails before heavy imports

    d = distributed.init(cfg.distributed)
    try:
        with Trainer(cfg, d) as trainer:
            return trainer.train()
    except ConfigError as e:
        print(f"config error{_where(e)}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, UserInputError, Diverged, CheckpointError) as e:
        print(f"error{_where(e)}: {e}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
