"""Checkpoint and adapter I/O: a one-shard-at-a-time reader, a PEFT adapter reader/writer, one planned
safetensors writer (single files, size-capped shards), atomic output folders and file hashes."""

from nlsr_fast.io._format import TensorInfo, read_header
from nlsr_fast.io.adapter import (
    LoraAdapter,
    LoraModule,
    check_adapter_matches_base,
    check_compatible,
    get_pattern_key,
    write_adapter,
)
from nlsr_fast.io.checkpoint import CheckpointReader
from nlsr_fast.io.hashing import file_record, sha256_file
from nlsr_fast.io.lock import OutputLock, lock_holder
from nlsr_fast.io.manifest import MANIFEST_FILE, check_manifest, is_output, write_manifest
from nlsr_fast.io.output import atomic_output, check_output, fsync_tree
from nlsr_fast.io.stream import PlannedSafetensors
from nlsr_fast.io.writer import PlannedShards, write_safetensors

__all__ = [
    "CheckpointReader",
    "MANIFEST_FILE",
    "OutputLock",
    "LoraAdapter",
    "LoraModule",
    "PlannedSafetensors",
    "PlannedShards",
    "TensorInfo",
    "atomic_output",
    "check_output",
    "check_adapter_matches_base",
    "check_compatible",
    "check_manifest",
    "file_record",
    "fsync_tree",
    "get_pattern_key",
    "is_output",
    "lock_holder",
    "read_header",
    "sha256_file",
    "write_adapter",
    "write_manifest",
    "write_safetensors",
]
