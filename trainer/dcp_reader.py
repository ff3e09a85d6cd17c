"""Reading a sharded checkpoint without running code from it.

torch.distributed.checkpoint's FileSystemReader reads `.metadata` with `pickle.load`, so a crafted file
runs whatever its `__reduce__` names (checked: `os.system` ran). `SafeReader` reads it with an unpickler
that resolves only the classes DCP metadata is made of; anything else is refused in one line before it
is called. The shard files hold raw tensor bytes, and pickled non-tensor entries (the optimizer's param
groups), which DCP's default planner reads with `torch.load(weights_only=False)`: `SafeLoadPlanner` reads
them with `weights_only=True` (tensors and plain Python values only).
"""

from __future__ import annotations

import collections
import pathlib
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from trainer.errors import ConfigError

_ALLOWED = {
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # a layout by name (as weights_only)
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp_filesystem._StorageInfo,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,  # read on Linux as the pure form
    ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}
_METADATA_CLASSES = {  # the metadata module's own records and enums
    "Metadata", "StorageMeta", "MetadataIndex", "TensorProperties", "TensorStorageMetadata",
    "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch.distributed.checkpoint.metadata" and name in _METADATA_CLASSES:
            return getattr(dcp_metadata, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_metadata(path: Path) -> Metadata:
    """The metadata of a sharded checkpoint, or ConfigError naming what it would have run."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise ConfigError(
            f"{path} names {e}, which checkpoint metadata never holds: it was not written by this trainer "
            f"(not loaded, nothing from it was run)"
        ) from None
    except (EOFError, ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path} is damaged ({type(e).__name__}): resume or export another checkpoint") from None
    if not isinstance(metadata, Metadata):
        raise ConfigError(f"{path} holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file-system reader, with `.metadata` read by `read_metadata`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, with pickled (non-tensor) entries read by `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item, value) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner uses

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
