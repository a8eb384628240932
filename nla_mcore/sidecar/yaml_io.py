"""Where sidecars live and how they go to and from disk: the two path rules, the YAML loader (a
mapping at the top level, or an error naming the file), the dumper (multi-line strings as ``|``
blocks, short lists of numbers inline), the atomic write (temporary file in the same directory,
fsync, rename) and the refusal to write anything that looks like a credential.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

from nla_mcore.sidecar.schema import SIDECAR_BASENAME, SIDECAR_SUFFIX, SidecarError

_SECRET_KEY_RE = re.compile(
    r"api[_-]?key|secret|passw(or)?d|credential|auth[_-]?token|access[_-]?token|hf[_-]?token"
    r"|bearer|private[_-]?key",
    re.IGNORECASE,
)
_SECRET_VALUE_RE = re.compile(r"\bsk-ant-[\w-]{10,}|\bsk-[A-Za-z0-9]{20,}|\bhf_[A-Za-z0-9]{30,}")


def model_sidecar_path(directory: str | Path) -> Path:
    """``{directory}/nla_meta.yaml``."""
    return Path(directory) / SIDECAR_BASENAME


def dataset_sidecar_path(parquet_path: str | Path) -> Path:
    """``{parquet_path}.nla_meta.yaml``."""
    parquet_path = Path(parquet_path)
    return parquet_path.with_name(parquet_path.name + SIDECAR_SUFFIX)


def _load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(
            f"no NLA sidecar at {path}: it ships beside the model's config.json "
            f"({SIDECAR_BASENAME}) or the parquet file (<file>{SIDECAR_SUFFIX})"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SidecarError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise SidecarError(
            f"{path}: expected a mapping at the top level, got {type(data).__name__}"
        )
    return data


class _SidecarDumper(yaml.SafeDumper):
    """Multi-line strings as ``|`` blocks, short lists of numbers inline."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


def _represent_list(dumper: yaml.SafeDumper, items: list) -> yaml.Node:
    inline = all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in items)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=inline or None)


_SidecarDumper.add_representer(str, _represent_str)
_SidecarDumper.add_representer(list, _represent_list)


def _write_yaml_atomically(path: Path, data: dict[str, Any]) -> None:
    _reject_secrets(data, path)
    text = yaml.dump(data, Dumper=_SidecarDumper, sort_keys=False, allow_unicode=True, width=120)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _reject_secrets(data: Any, path: Path, where: str = "") -> None:
    """Refuse to write anything whose key or value looks like a credential."""
    if isinstance(data, dict):
        for key, value in data.items():
            dotted = f"{where}.{key}" if where else str(key)
            if _SECRET_KEY_RE.search(str(key)) and value not in (None, ""):
                raise SidecarError(f"{path}: refusing to write {dotted!r}: it looks like a secret")
            _reject_secrets(value, path, dotted)
    elif isinstance(data, list):
        for index, item in enumerate(data):
            _reject_secrets(item, path, f"{where}[{index}]")
    elif isinstance(data, str) and _SECRET_VALUE_RE.search(data):
        raise SidecarError(f"{path}: refusing to write {where!r}: its value looks like an API key")
