"""``python -m bench``: run every benchmark and print its figures."""

from __future__ import annotations

import argparse
import asyncio

from bench.relay import run_relay
from bench.scrape import run_scrape


def main() -> None:
    """Parse the options and run the relay and scrape benchmarks."""
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--calls", type=int, default=20, help="simultaneous calls")
    parser.add_argument("--seconds", type=int, default=10, help="length of each call")
    parser.add_argument(
        "--workspaces", type=int, default=500, help="workspaces with a plan to scrape"
    )
    options = parser.parse_args()
    asyncio.run(run_relay(calls=options.calls, call_secs=options.seconds))
    asyncio.run(run_scrape(workspaces=options.workspaces))


if __name__ == "__main__":
    main()
