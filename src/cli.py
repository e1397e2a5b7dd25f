"""The command line every stage shares: ``--config FILE`` plus dotted ``key=value`` overrides, and user-fixable
errors as one line with exit status 2. ``python -m src.cli [--config FILE] [overrides] [--get KEY]`` prints the
resolved config (or single keys of it, for the shell scripts)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from typing import Any

import yaml

from src.config import DEFAULT_CONFIG, Config, ConfigError, PipelineError, load_config


def cli_parser(description: str) -> argparse.ArgumentParser:
    """The argument parser every stage starts from: ``--config FILE`` and ``key=value`` overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser

def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)

def user_message(exc: BaseException) -> str:
    """The message of a user-fixable error, without the worker traceback that a DataLoader worker wraps
    around an exception it re-raises in the main process ("Caught DataError in DataLoader worker...")."""
    message = str(exc)
    if "Original Traceback" in message:
        last = [line for line in message.splitlines() if line.strip()][-1]
        message = re.sub(r"^(?:[a-z_]\w*\.)*[A-Z]\w*(?:Error|Exception|Failed|Diverged): ", "", last)
    return message

def run_cli(main: Callable[[], Any]) -> None:
    """Run a stage's CLI: a user-fixable problem, or a file that cannot be read or written, prints one
    clear line and exits 2, no traceback."""
    try:
        main()
    except PipelineError as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # disk full, permission denied, a file where a folder should be, ...
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        sys.exit(2)

def main() -> None:
    parser = cli_parser("Print the resolved config (or one key of it).")
    parser.add_argument("--get", metavar="KEY", action="append",
                        help="print only this dotted key's value (repeatable: one line per key)")
    args = parser.parse_args()
    cfg = config_from_args(args)
    if args.get:
        for key in args.get:
            value = cfg.model_dump()
            for part in key.split("."):
                if not isinstance(value, dict) or part not in value:
                    raise ConfigError(f"unknown config key '{key}'")
                value = value[part]
            print(value)
    else:
        print(yaml.safe_dump(cfg.model_dump(), sort_keys=False), end="")


if __name__ == "__main__":
    run_cli(main)
