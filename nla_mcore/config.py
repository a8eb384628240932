"""One structured config tree: dataclasses + OmegaConf, YAML files and dotted CLI overrides.

Each component owns a `@dataclass(kw_only=True, slots=True)` config with a docstring under
every field; a verb's config is a dataclass composing those.  `load_config(Schema, yaml,
overrides)` merges defaults <- YAML <- `key=value` overrides, type-checks them through
OmegaConf (an unknown key or a wrong type fails naming the dotted key), and returns a plain
dataclass instance whose `__post_init__` checks have run.  `describe(Schema)` renders the
field docstrings as CLI help.  The same object is what local runs, torchrun, sbatch and
NeMo-Run recipes receive, so a run is reproducible from its saved YAML.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Defaults of `schema`, then the YAML at `path`, then `key=value` overrides."""
    base = OmegaConf.structured(schema)
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as err:  # omegaconf/yaml raise many types; report the file
            raise ConfigError(f"cannot parse {path}: {err}") from err
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    layers.append(OmegaConf.from_dotlist(list(overrides)))
    try:
        merged = OmegaConf.merge(base, *layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{_first_line(err)} (key: {getattr(err, 'full_key', '?')})") from err


def to_yaml(config: Any) -> str:
    """The config as YAML (what a run saves next to its outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def describe(schema: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, docstring) for every leaf field of `schema`, recursively."""
    rows = []
    docs = field_docs(schema)
    for field in dataclasses.fields(schema):
        key = f"{prefix}{field.name}"
        ftype = _resolved_type(schema, field.name)
        if dataclasses.is_dataclass(ftype):
            rows.extend(describe(ftype, prefix=f"{key}."))
            continue
        default = field.default if field.default is not dataclasses.MISSING else "(required)"
        if field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        rows.append((key, repr(default), docs.get(field.name, "")))
    return rows


def help_text(schema: type) -> str:
    """`describe` formatted for a terminal."""
    lines = []
    for key, default, doc in describe(schema):
        lines.append(f"  {key} = {default}")
        if doc:
            lines.extend(
                textwrap.wrap(doc, width=88, initial_indent="      ", subsequent_indent="      ")
            )
    return "\n".join(lines)


@cache
def field_docs(schema: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (PEP 257 attribute docstrings),
    including fields inherited from dataclass bases (a subclass's own docs win)."""
    docs: dict[str, str] = {}
    for cls in reversed(schema.__mro__):
        if dataclasses.is_dataclass(cls):
            docs.update(_own_field_docs(cls))
    return docs


def _own_field_docs(schema: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(schema)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _resolved_type(schema: type, name: str):
    import typing

    return typing.get_type_hints(schema).get(name)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0]
