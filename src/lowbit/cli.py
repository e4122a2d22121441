"""Command line: `lowbit check` (conformance sweep) and `lowbit bench` (speed beside peers; `--model minilm`:
quality of a real quantized model beside MLX)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowbit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="conformance sweep of every op and format on every device")
    check.add_argument("--full", action="store_true", help="the long sweep (all group sizes, more shapes)")
    check.add_argument("--device", help="one device only (cpu, cuda)")
    bench = sub.add_parser("bench", help="quantized matmul speed beside MLX and torch on this machine")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--quick", action="store_true", help="fewer shapes")
    bench.add_argument("--output", help="also write the markdown table to this file")
    bench.add_argument("--model", choices=("minilm",),
                       help="instead of speed: embedding quality of all-MiniLM-L6-v2 per format, lowbit beside MLX")
    args = parser.parse_args(argv)
    if args.command == "check":
        from .check import main as check_main

        return check_main(full=args.full, device=args.device)
    if args.model == "minilm":
        from .quality import main as quality_main

        command = "lowbit bench --model minilm" + ("" if args.device == "cpu" else f" --device {args.device}")
        command += f" --output {args.output}" if args.output else ""
        return quality_main(device=args.device, output=args.output, command=command)
    from .bench import main as bench_main

    return bench_main(device=args.device, quick=args.quick, output=args.output)


if __name__ == "__main__":
    sys.exit(main())
