"""Entry point: `python -m trainer.main [--config FILE] [key=value ...]`, alone or under torchrun."""
import sys

from common import cli
from trainer import preemption


def train(args) -> int:
    from trainer import distributed, precision
    from trainer.config import check_paths, load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    precision.check_device(cfg.train.precision)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    check_paths(cfg)

    from trainer.trainer import Trainer  # after validation: bad input fails before heavy imports

    with Trainer(cfg, distributed.init(cfg.distributed)) as trainer:
        return trainer.train()


def main(argv=None) -> int:
    preemption.follow_agent()  # first: the imports below take seconds (see its docstring)
    from trainer import distributed
    from trainer.config import parse_args

    return cli.run(parse_args, train, argv, close=distributed.shutdown)


if __name__ == "__main__":
    sys.exit(main())
