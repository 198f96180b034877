"""Change one float of a model's safetensors file in place, keeping the file's size, inode and mtime."""

import json
import os
import struct
from pathlib import Path


def change_weight_in_place(file: Path, tensor: str, index: int, add: float) -> float:
    """Add ``add`` to element ``index`` (flat) of the float32 ``tensor``, writing only its 4 bytes, and put
    the file's access and modification times back; returns the old value."""
    before = os.stat(file)
    with open(file, "r+b") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(header_len))[tensor]
        assert info["dtype"] == "F32", info
        f.seek(8 + header_len + info["data_offsets"][0] + 4 * index)
        (old,) = struct.unpack("<f", f.read(4))
        f.seek(-4, os.SEEK_CUR)
        f.write(struct.pack("<f", old + add))
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(file)
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (before.st_size, before.st_ino, before.st_mtime_ns)
    return old
