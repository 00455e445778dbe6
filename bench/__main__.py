"""``python -m bench``: run every benchmark and print its figures."""

from __future__ import annotations

import argparse
import asyncio

from bench.relay import run_relay


def main() -> None:
    """Parse the options and run the relay benchmark."""
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--calls", type=int, default=20, help="simultaneous calls")
    parser.add_argument("--seconds", type=int, default=10, help="length of each call")
    options = parser.parse_args()
    asyncio.run(run_relay(calls=options.calls, call_secs=options.seconds))


if __name__ == "__main__":
    main()
