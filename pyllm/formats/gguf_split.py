"""The files of a split GGUF model, by llama.cpp's gguf-split names: PREFIX-00001-of-00003.gguf, ...

gguf-split (and gguf-py's writer with a split limit) writes a model as `count` shards named
PREFIX-%05d-of-%05d.gguf (1-based), each with the metadata keys split.no (0-based), split.count
and split.tensors.count (the tensors of all shards); the first holds the model's other metadata,
every shard some of its tensors (the first possibly none). llama.cpp finds the other shards by
these names, as pyllm does: from the name alone here (without reading a file: the model cache
fingerprints every shard on each run), the metadata is checked when the shards are read
(convert/gguf_source.py).
"""

from __future__ import annotations

import os
import re

SPLIT_NAME = re.compile(r"(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf")


def split_name(path: str) -> tuple[str, int, int] | None:
    """(prefix with its directory, shard number from 1, shard count) of a shard's gguf-split name, else None."""
    m = SPLIT_NAME.fullmatch(os.path.basename(path))
    if not m:
        return None
    no, count = int(m["no"]), int(m["count"])
    if not 1 <= no <= count:
        return None
    return os.path.join(os.path.dirname(path), m["prefix"]), no, count


def shard_path(prefix: str, no: int, count: int) -> str:
    """The name gguf-split gives shard `no` (from 1) of `count`: llama.cpp's llama_split_path."""
    return f"{prefix}-{no:05d}-of-{count:05d}.gguf"


def split_parts(path: str) -> list[str]:
    """Every shard of the split set `path` is named as part of (first first; some may not exist), or
    [path] for a name that is not a shard's (or a set of one)."""
    found = split_name(path)
    if found is None or found[2] == 1:
        return [path]
    prefix, _, count = found
    return [shard_path(prefix, i, count) for i in range(1, count + 1)]
