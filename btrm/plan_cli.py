"""The memory plan's command line (run_bt_rm.sh --plan): its options, the config and the model checked before torch.

    python -m btrm.plan_cli [--gpus N] [--gpu-memory GIB] [--margin FRACTION] [--tokens N] [--device cuda|cpu]
                            [--no-search] [--no-suggestions] [overrides...]

Before btrm.plan (torch, transformers: 5-7 s of imports on 2 cores) is imported, in well under 2 s:
the options (types and ranges: one line `error: --gpus 0: expected ...`, exit status 2, no usage text),
the config (trainer.yaml + the overrides, btrm.schema, with --gpus as the world size when given) and
the model (btrm.preflight.check_model: a local directory with config.json, or a hub id with the hub
reachable, the launcher's 3-second probe), so that an unreachable hub is one line in seconds rather
than transformers' retries. What the plan itself finds (a micro-batch that cannot fit) is btrm.plan's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

from btrm.cli import OneLineParser
from btrm.plan_assumptions import DEFAULT_GPU_MEMORY_GIB, DEFAULT_GPUS
from btrm.schema import PreflightError

EXIT_REPORTED = 2


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="python -m btrm.plan",
        description="Plan a bt-rm training run's memory per GPU on fake tensors (no GPU, no weights).",
    )
    parser.add_argument("--gpus", type=int, default=None, help=f"ranks (default: visible GPUs, else {DEFAULT_GPUS})")
    parser.add_argument(
        "--gpu-memory",
        type=float,
        default=None,
        help=f"GiB per GPU, > 0 (default: the visible GPU's, else {DEFAULT_GPU_MEMORY_GIB:g})",
    )
    parser.add_argument(
        "--margin", type=float, default=None, help="share kept free, in [0, 1) (default: trainer.gpu_memory_margin)"
    )
    parser.add_argument(
        "--tokens", type=int, default=None, help="micro-batch tokens to simulate, >= 2 (default: from the config)"
    )
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default=None, help="planned device (default: trainer.device)"
    )
    parser.add_argument("--no-search", action="store_true", help="skip the search for the largest fitting budget")
    parser.add_argument(
        "--no-suggestions", action="store_true", help="when it does not fit, do not plan the changes that would"
    )
    parser.add_argument("--config-yaml", default=None, help=argparse.SUPPRESS)  # plan_in_subprocess's composed config
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of trainer.yaml, e.g. model.lora_rank=64")
    return parser.parse_intermixed_args(argv)


def check_options(args: argparse.Namespace) -> None:
    """The options' ranges (btrm.plan.resolve_settings says the same of values given through its API)."""
    if args.gpus is not None and args.gpus < 1:
        raise PreflightError(f"--gpus {args.gpus}: expected at least 1")
    if args.gpu_memory is not None and not (math.isfinite(args.gpu_memory) and args.gpu_memory > 0):
        raise PreflightError(f"--gpu-memory {args.gpu_memory:g}: expected a positive number of GiB")
    if args.margin is not None and not 0 <= args.margin < 1:
        raise PreflightError(f"--margin {args.margin:g}: expected a fraction in [0, 1)")
    if args.tokens is not None and args.tokens < 2:
        raise PreflightError(f"--tokens {args.tokens}: a micro-batch holds at least one pair (2 tokens)")


def checked_config(args: argparse.Namespace):
    """The composed (or handed-over) config, checked with --gpus as the world size, and its model found."""
    if args.config_yaml:  # plan_in_subprocess: composed and checked by the caller
        from omegaconf import OmegaConf

        return OmegaConf.load(args.config_yaml)
    from btrm import preflight
    from btrm.schema import check_config, compose_config

    config = compose_config(args.overrides)
    check_config(config, world_size=args.gpus)
    preflight.check_model(str(config.model.partial_pretrain))
    return config


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)  # a refused command line: one line, exit status 2 (btrm.cli.OneLineParser)
    try:
        check_options(args)
        config = checked_config(args)
        from btrm import plan  # torch and transformers: only once the inputs are known to be good

        result = plan.plan_config(
            config,
            gpus=args.gpus,
            gpu_memory_gib=args.gpu_memory,
            margin=args.margin,
            tokens=args.tokens,
            device=args.device,
            search=not args.no_search,
            suggest=not args.no_suggestions,
        )
    except PreflightError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_REPORTED
    print(plan.format_report(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
