"""`nla-mcore <verb> ...`: one CLI for every stage.

Config verbs take `[--config FILE.yaml] [key=value ...]` (one schema each, from the config tree,
see `nla_mcore.config`); the CLI validates the config *before* launching ranks, so a typo fails
in a second with the key named, then hands the same arguments to the rank program (through
torchrun when several local ranks are asked for).  `nla-mcore <verb> --help` lists every key.

`convert` takes flags (`--hf/--ckpt/--out/--tp/--pp`), as checkpoint tools conventionally do;
`explain` takes flags too (`--av/--ar/--parquet/--rows`): it runs in this process, on one device.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ConfigVerb:
    """A verb whose rank program (`module.main(argv)`) reads a config schema."""

    module: str
    schema: Callable[[], type]
    summary: str
    nproc: Callable[[object], int] = lambda cfg: 1
    module_args: tuple[str, ...] = ()
    """Arguments before the config ones (e.g. the role of a shared rank program)."""
    preflight: Callable[[object], None] | None = None
    """Checks that need files (not just the schema), run before any rank is launched."""


def _quickstart_schema():
    from nla_mcore.quickstart import QuickstartConfig

    return QuickstartConfig


def _datagen_schema():
    from nla_mcore.datagen.extract_main import MCoreDatagenConfig

    return MCoreDatagenConfig


def _datagen_ranks(cfg) -> int:
    from nla_mcore.datagen.extract_main import launched_ranks

    return launched_ranks(cfg)  # 1 when "extract" is not among the stages


def _sft_schema(role: str):
    from nla_mcore.train.sft_config import ARSFTConfig, AVSFTConfig

    return ARSFTConfig if role == "ar" else AVSFTConfig


def _sft_preflight(role: str):
    def check(cfg) -> None:
        from nla_mcore.train.sft_preflight import preflight

        preflight(cfg, role)

    return check


CONFIG_VERBS: dict[str, ConfigVerb] = {
    "quickstart": ConfigVerb(
        module="nla_mcore.quickstart",
        schema=_quickstart_schema,
        summary="train a toy model for a few steps on CPU ranks (the whole stack, no downloads)",
        nproc=lambda cfg: cfg.nproc,
    ),
    "datagen": ConfigVerb(
        module="nla_mcore.datagen.extract_main",
        schema=_datagen_schema,
        summary="make the AV-SFT, AR-SFT and RL files: extract (Megatron-Core, any layout), "
        "split, explain, build",
        nproc=_datagen_ranks,
    ),
    "sft-ar": ConfigVerb(
        module="nla_mcore.train.sft",
        schema=lambda: _sft_schema("ar"),
        summary="supervised training of the AR (explanation -> vector) on ar_sft.parquet",
        nproc=lambda cfg: cfg.nproc,
        module_args=("ar",),
        preflight=_sft_preflight("ar"),
    ),
    "sft-av": ConfigVerb(
        module="nla_mcore.train.sft",
        schema=lambda: _sft_schema("av"),
        summary="supervised training of the AV (vector -> explanation) on av_sft.parquet",
        nproc=lambda cfg: cfg.nproc,
        module_args=("av",),
        preflight=_sft_preflight("av"),
    ),
}

CONVERT_SUMMARY = "convert checkpoints: hf-to-mcore (HF -> dist-checkpoint), mcore-to-hf (export)"
EXPLAIN_SUMMARY = "explain a parquet's vectors with an exported AV, score them with an AR"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nla-mcore",
        description="Train Natural Language Autoencoders (AV + AR) on Megatron-Core.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="verb")
    for name, verb in CONFIG_VERBS.items():
        p = sub.add_parser(name, help=verb.summary, description=verb.summary, add_help=False)
        p.add_argument("-h", "--help", action="store_true", help="list the config keys")
        p.add_argument("--config", help="YAML config file (overridden by key=value arguments)")
        p.add_argument("overrides", nargs="*", metavar="key=value")
    convert = sub.add_parser("convert", help=CONVERT_SUMMARY, description=CONVERT_SUMMARY)
    convert.add_argument("direction", choices=["hf-to-mcore", "mcore-to-hf"])
    convert.add_argument("args", nargs=argparse.REMAINDER, help="see `convert <direction> --help`")
    explain = sub.add_parser("explain", help=EXPLAIN_SUMMARY, add_help=False)
    explain.add_argument("args", nargs=argparse.REMAINDER, help="see `explain --help`")
    return parser


def _run_config_verb(name: str, args) -> int:
    from nla_mcore.config import ConfigError, help_text, load_config
    from nla_mcore.launchers.local import launch

    verb = CONFIG_VERBS[name]
    schema = verb.schema()
    if args.help:
        print(f"nla-mcore {name}: {verb.summary}\n\nconfig keys (set with key=value):")
        print(help_text(schema))
        return 0
    try:
        cfg = load_config(schema, args.config, args.overrides)
        if verb.preflight is not None:
            verb.preflight(cfg)
    except (ConfigError, ValueError) as err:
        print(f"nla-mcore {name}: invalid config: {err}", file=sys.stderr)
        return 2
    rank_args = (["--config", args.config] if args.config else []) + list(args.overrides)
    return launch(verb.module, verb.nproc(cfg), [*verb.module_args, *rank_args])


def _run_convert(args) -> int:
    from nla_mcore.launchers.local import launch

    if args.direction == "mcore-to-hf":
        from nla_mcore.converters.mcore_to_hf import main as export_main

        export_main(args.args)
        return 0
    sizes = argparse.ArgumentParser(add_help=False)
    sizes.add_argument("--tp", type=int, default=1)
    sizes.add_argument("--pp", type=int, default=1)
    known, _ = sizes.parse_known_args(args.args)
    return launch("nla_mcore.converters.hf_to_mcore", known.tp * known.pp, list(args.args))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["explain"]:  # its own flags, --help included (argparse.REMAINDER drops it)
        from nla_mcore.inference.explain import main as explain_main

        return explain_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.verb == "convert":
        return _run_convert(args)
    return _run_config_verb(args.verb, args)


if __name__ == "__main__":
    sys.exit(main())
