"""Hugging Face checkpoint I/O: lazy sliced reads, streamed sharded writes, atomic directories.

* `HFReader` opens `model.safetensors` or a sharded `model-*-of-*.safetensors` set (via
  `model.safetensors.index.json`) and reads a tensor, or only a slice of it, without loading the
  rest: a converting rank touches only the rows/columns of its own shard, so a 70B model never
  sits whole in one process.  Only safetensors are read (no pickle).
* `ShardedWriter` takes tensors one at a time, flushes a shard when it reaches `max_shard_bytes`,
  and at `close()` names the shards `model-0000i-of-0000n.safetensors` and writes the index, as
  `save_pretrained` does.  Peak memory is one shard.
* `atomic_directory(out)` builds an output in a sibling temp directory and renames it into place
  only when complete: an interrupted run leaves the previous output (if any) untouched and
  nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
)


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not match what is asked of it."""


class HFReader:
    """Lazy reader over the safetensors files of an HF model directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._file_of = self._weight_map()
        self._handles: dict[str, object] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX
        if index.is_file():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from err
        single = self.directory / SINGLE
        if single.is_file():
            with safe_open(str(single), framework="pt") as f:
                return {name: SINGLE for name in f.keys()}
        if any(self.directory.glob("*.bin")) or any(self.directory.glob("*.pt")):
            raise CheckpointError(
                f"{self.directory} holds only pickle (.bin/.pt) weights; nla-mcore reads "
                "safetensors only (convert with `save_pretrained(..., safe_serialization=True)`)"
            )
        raise CheckpointError(f"no {SINGLE} or {INDEX} in {self.directory}")

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _handle(self, name: str):
        if name not in self._file_of:
            raise CheckpointError(f"tensor '{name}' is not in {self.directory}")
        file = self._file_of[name]
        if file not in self._handles:
            path = self.directory / file
            if not path.is_file():
                raise CheckpointError(f"{path} (listed in the index for '{name}') is missing")
            self._handles[file] = safe_open(str(path), framework="pt")
        return self._handles[file]

    def _slice(self, name: str):
        try:
            return self._handle(name).get_slice(name)
        except SafetensorError as err:
            raise CheckpointError(
                f"tensor '{name}' is listed for {self._file_of[name]} in {self.directory} but "
                f"cannot be read from it: {err}"
            ) from err

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None):
        """The tensor `name`, or rows/columns `[start, stop)` of dimension `dim`."""
        sliced = self._slice(name)
        if dim is None:
            return sliced[:]
        index = [slice(None)] * len(sliced.get_shape())
        index[dim] = slice(start, stop)
        return sliced[tuple(index)]


class ShardedWriter:
    """Streams tensors into `model-0000i-of-0000n.safetensors` + index inside `directory`."""

    def __init__(self, directory: str | Path, max_shard_bytes: int = 5 * 2**30):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # temp file name, tensor names
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._shards):
            raise CheckpointError(f"tensor '{name}' written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().cpu().contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        temp = f"shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, str(self.directory / temp), metadata={"format": "pt"})
        self._shards.append((temp, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, name all shards and write the index; returns the file names."""
        if self._pending:
            self._flush()
        n = len(self._shards)
        weight_map, files = {}, []
        for i, (temp, names) in enumerate(self._shards):
            final = SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.directory / temp, self.directory / final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        return files


@contextlib.contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside `out`; on success it replaces `out`, on error it is removed.

    Stale temp directories of killed runs (`.<name>.tmp-*`) are removed on the next call.
    """
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield temp
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    replace_directory(temp, out)


def share_permissions(path: str | Path) -> None:
    """Give a finished output tree the permissions the user's umask gives new files (mkdtemp
    makes 0700 directories and safetensors' atomic writes 0600 files, which collaborators on a
    shared cluster could not read)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _dirs, files in os.walk(path):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def replace_directory(new: Path, out: Path) -> None:
    """Move `new` to `out`, replacing an existing `out` (old copy removed only after the move)."""
    share_permissions(new)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_tokenizer_files(source: str | Path, dest: str | Path) -> list[str]:
    """Copy the tokenizer/generation files found in `source` to `dest`; returns their names."""
    source, dest = Path(source), Path(dest)
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
            copied.append(name)
    return copied
