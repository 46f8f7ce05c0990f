"""`python -m bench.gpu_check.part --part NAME ...`: one part of the GPU check in this process, its result as JSON.

bench.gpu_check.run starts every part this way, in its own process with a time box, so that a CUDA fault or a stuck
compile in one part cannot take the others down. A part returns Passed (its figures and headline), or raises
CheckFailed (with the figures it got); any other exception is its failure too, with the traceback in the log.
"""
import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

from bench.gpu_check.context import CheckFailed, Context
from bench.gpu_check.run import PARTS


def main(argv=None) -> int:
    parts = {part.name: part for part in PARTS}
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check.part", description=__doc__.splitlines()[0])
    parser.add_argument("--part", required=True, choices=list(parts))
    parser.add_argument("--mode", required=True, choices=("gpu", "cpu-smoke"))
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--result", required=True, type=Path, help="the part's JSON result goes here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    ctx = Context(args.mode, args.work, progress_file=args.result.with_suffix(".progress"),
                  partial_file=args.result.with_suffix(".partial.json"))
    try:
        module, function = parts[args.part].check.split(":")
        check = getattr(importlib.import_module(module), function)
        passed = check(ctx)
        result = {"status": "pass", "headline": passed.headline, **passed.figures}
    except CheckFailed as e:
        result = {**ctx.recorded(), "status": "fail", "reason": str(e), **e.figures}
    except Exception as e:  # noqa: BLE001 - any error is this part's failure, reported with its traceback in the log
        traceback.print_exc()
        last_line = (str(e).strip().splitlines() or [""])[-1]
        # What it had measured stays: a compile that crashes leaves the eager figures.
        result = {**ctx.recorded(), "status": "fail", "reason": f"{type(e).__name__}: {last_line}"}
    result["seconds"] = round(time.perf_counter() - start, 1)
    args.result.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
