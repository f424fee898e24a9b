"""A tar stream read forward in one pass, every header bounded before anything it describes is read.

Python's `tarfile` reads a PAX extended header ('x', 'g') or a GNU long name
('L', 'K') whole while it iterates, whatever size the header declares and
before a caller can check anything: a 2 MB archive can then cost gigabytes.
Here each 512-byte header block is parsed on its own (`TarInfo.frombuf`:
checksum, octal and GNU base-256 numbers), extension headers are capped at a
few KiB and applied to the member they precede, the caller checks each member
before its data are read or skipped, and the whole stream is capped. Nothing
seeks; reading stops at the first end-of-archive block, as `tarfile` does.
"""

from __future__ import annotations

import dataclasses
import re
import tarfile
from collections.abc import Callable
from typing import BinaryIO

from cifar3study.errors import StageError

BLOCK = tarfile.BLOCKSIZE
EXTENSIONS = {tarfile.XHDTYPE: "PAX extended", tarfile.XGLTYPE: "PAX global", tarfile.GNUTYPE_LONGNAME: "GNU long-name",
              tarfile.GNUTYPE_LONGLINK: "GNU long-link"}
APPLIED = ("path", "linkpath", "size")  # the PAX records that change what a member is; others (times, owners) are ignored
_PAX_RECORD = re.compile(rb"([0-9]{1,9}) ([^=\n]+)=")


@dataclasses.dataclass(frozen=True)
class Limits:
    members: int  # files, folders and anything else, not counting extension headers
    extension_bytes: int  # one PAX or GNU long-name header's data
    total_bytes: int  # the decompressed stream as far as it is read


class _Reader:
    """The decompressed stream, read forward only, refused once more than `cap` bytes are asked for."""

    def __init__(self, stream: BinaryIO, cap: int) -> None:
        self.stream, self.cap, self.done = stream, cap, 0

    def read(self, n: int) -> bytes:
        if self.done + n > self.cap:
            raise StageError(f"the archive unpacks to more than {self.cap:,} bytes, more than the CIFAR-10 archive; "
                             "refusing the archive")
        data = self.stream.read(n)
        if len(data) != n:
            raise tarfile.ReadError("unexpected end of data")
        self.done += n
        return data

    def skip(self, n: int) -> None:
        while n:
            n -= len(self.read(min(n, 1 << 20)))

    def block(self) -> bytes | None:
        """The next header block; None where the stream ends between members (tarfile accepts that too)."""
        first = self.stream.read(1)
        if not first:
            return None
        self.done += 1
        return first + self.read(BLOCK - 1)


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _pax_records(data: bytes) -> dict[str, str]:
    """'<length> <key>=<value>\\n' records, the format POSIX.1-2008 defines, checked as tarfile checks them."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        match = _PAX_RECORD.match(data, pos)
        end = pos + int(match[1]) if match else 0
        if not match or not match.end() < end <= len(data) or data[end - 1] != 0x0A:
            raise tarfile.ReadError("malformed PAX header")
        records[match[2].decode("utf-8", "surrogateescape")] = data[match.end():end - 1].decode("utf-8", "surrogateescape")
        pos = end
    return records


def _extension(kind: bytes, data: bytes) -> dict[str, str]:
    """What an extension header changes in the member after it (only `APPLIED` keys)."""
    if kind in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
        name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        return {"path" if kind == tarfile.GNUTYPE_LONGNAME else "linkpath": name}
    records = _pax_records(data)
    if any(key.startswith("GNU.sparse") for key in records):
        raise StageError("the archive has a sparse member (GNU.sparse PAX records); refusing the archive")
    changes = {key: value for key, value in records.items() if key in APPLIED}
    if kind == tarfile.XGLTYPE and changes:  # would rename or resize every later member
        raise StageError(f"the archive has a global PAX header setting {', '.join(changes)}; refusing the archive")
    return changes


def _apply(info: tarfile.TarInfo, changes: dict[str, str]) -> tarfile.TarInfo:
    if "path" in changes:
        info.name = changes["path"].rstrip("/") if info.isdir() else changes["path"]
    if "linkpath" in changes:
        info.linkname = changes["linkpath"]
    if "size" in changes:
        if not re.fullmatch(r"[0-9]{1,20}", changes["size"]):
            raise tarfile.ReadError("invalid PAX size")
        info.size = int(changes["size"])
    if info.size < 0:
        raise tarfile.ReadError("negative member size")
    return info


def _next_member(reader: _Reader, limits: Limits) -> tarfile.TarInfo | None:
    """The next member's header with its extension headers applied; None at the end of the archive."""
    changes: dict[str, str] = {}
    while (block := reader.block()) is not None and block.count(0) != BLOCK:
        info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        if info.type not in EXTENSIONS:
            return _apply(info, changes)
        if not 0 <= info.size <= limits.extension_bytes:
            raise StageError(f"the archive has a {EXTENSIONS[info.type]} header of {info.size:,} bytes, more than "
                             f"{limits.extension_bytes:,}; refusing the archive")
        data = reader.read(_padded(info.size))[: info.size]
        for key, value in _extension(info.type, data).items():
            changes.setdefault(key, value)  # the first of several applies, as in tarfile
    return None


def read_members(stream: BinaryIO, limits: Limits, check: Callable[[tarfile.TarInfo], None],
                 wanted: set[str]) -> dict[str, bytes]:
    """{name: data} of the `wanted` regular members; `check` sees (and may refuse) every member before it is read."""
    reader, files, count = _Reader(stream, limits.total_bytes), {}, 0
    while (member := _next_member(reader, limits)) is not None:
        count += 1
        if count > limits.members:
            raise StageError(f"archive has more than {limits.members} members; it is not the CIFAR-10 python archive")
        check(member)
        size = member.size if member.isreg() else 0  # tarfile too reads data after regular members only
        if member.isreg() and member.name in wanted:
            files[member.name] = reader.read(size)
            reader.skip(_padded(size) - size)
        else:
            reader.skip(_padded(size))
    return files
