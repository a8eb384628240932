"""`nla-mcore <verb> [--config FILE.yaml] [key=value ...]`: one CLI for every stage.

Each verb has one config schema (a dataclass of the config tree, see `nla_mcore.config`); the
CLI validates the config *before* launching ranks, so a typo fails in a second with the key
named, then hands the same arguments to the rank program (through torchrun when several local
ranks are asked for).  `nla-mcore <verb> --help` lists every key with its default and doc.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Verb:
    """A CLI verb: its rank program (a module with `main(argv)`) and its config schema."""

    module: str
    schema: Callable[[], type]
    summary: str
    nproc: Callable[[object], int] = lambda cfg: 1


def _quickstart_schema():
    from nla_mcore.quickstart import QuickstartConfig

    return QuickstartConfig


VERBS: dict[str, Verb] = {
    "quickstart": Verb(
        module="nla_mcore.quickstart",
        schema=_quickstart_schema,
        summary="train a toy model for a few steps on CPU ranks (the whole stack, no downloads)",
        nproc=lambda cfg: cfg.nproc,
    ),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nla-mcore",
        description="Train Natural Language Autoencoders (AV + AR) on Megatron-Core.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="verb")
    for name, verb in VERBS.items():
        p = sub.add_parser(name, help=verb.summary, description=verb.summary, add_help=False)
        p.add_argument("-h", "--help", action="store_true", help="list the config keys")
        p.add_argument("--config", help="YAML config file (overridden by key=value arguments)")
        p.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    from nla_mcore.config import ConfigError, help_text, load_config
    from nla_mcore.launchers.local import launch

    args = _parser().parse_args(argv)
    verb = VERBS[args.verb]
    schema = verb.schema()
    if args.help:
        print(f"nla-mcore {args.verb}: {verb.summary}\n\nconfig keys (set with key=value):")
        print(help_text(schema))
        return 0
    try:
        cfg = load_config(schema, args.config, args.overrides)
    except (ConfigError, ValueError) as err:
        print(f"nla-mcore {args.verb}: invalid config: {err}", file=sys.stderr)
        return 2
    rank_args = (["--config", args.config] if args.config else []) + list(args.overrides)
    return launch(verb.module, verb.nproc(cfg), rank_args)


if __name__ == "__main__":
    sys.exit(main())
