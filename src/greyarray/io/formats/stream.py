"""Read a whole image file, plain or gzip-compressed, in bounded memory and time, hashing it.

NIfTI (``.nii``/``.nii.gz``) and MRtrix (``.mif``/``.mif.gz``) files are read front to back once:
the header first (a parser says how many bytes it needs), then exactly the data block the header
promises. A gzip stream is inflated only as far as that: one that would inflate beyond its
header's promise by more than ``SLACK`` (a gzip bomb) is refused without inflating the rest, and
a stream that ends early is truncated. The sha256 is that of the file's bytes as stored (the
compressed bytes of a ``.gz``, as ``sha256sum`` gives; for a plain file its header and data).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from isal import (
    isal_zlib as zlib,  # zlib's formats by ISA-L: deflate ~10x, inflate ~2x zlib's speed
)

from greyarray.errors import DataError
from greyarray.io import inputs

CHUNK = 2**20  # compressed bytes read per call
SLACK = 2**20  # decompressed bytes a .gz may hold beyond what its header promises
MAX_DATA_BYTES = 2**30  # one map's data block: far beyond any real map (a 0.5 mm brain)
GZIP_MAGIC = b"\x1f\x8b"


# zlib's levels 0-9 as ISA-L's 0-3, by size: on maps ISA-L's level 1 compresses as zlib's level 4
ISAL_LEVELS = (0, 1, 1, 1, 1, 2, 2, 3, 3, 3)


def deflate(data: bytes, level: int) -> bytes:
    """A zlib stream (HDF5's gzip filter and every zlib reader inflate it), by ISA-L."""
    return zlib.compress(data, ISAL_LEVELS[level])


def gzip_bytes(data: bytes, level: int) -> bytes:
    """A gzip file's bytes (header time 0, so equal data give equal files), by ISA-L."""
    packer = zlib.compressobj(ISAL_LEVELS[level], zlib.DEFLATED, 31)
    return packer.compress(data) + packer.flush()


class ImageStream:
    """The (decompressed) bytes of one opened file, read in order."""

    def __init__(self, fd: int, path: Path, size: int):
        self.fd, self.path, self.size = fd, path, size
        self.digest = hashlib.sha256()
        self.gzipped = size >= 2 and inputs.pread_exact(fd, 2, 0, path) == GZIP_MAGIC
        self.position = 0  # decompressed bytes handed out
        self._raw = 0  # file bytes consumed
        self._inflate = zlib.decompressobj(wbits=31) if self.gzipped else None
        self._pending = b""  # compressed bytes not yet fed to the inflater
        self._buffer = b""  # decompressed bytes not yet handed out

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes (fewer only at the end of the stream)."""
        if not self.gzipped:
            end = min(self.size, self.position + size)
            if end <= self.position:
                return b""
            data = inputs.pread_exact(self.fd, end - self.position, self.position, self.path)
            self.digest.update(data)
            self.position = end
            return data
        parts, need = [], size
        while need > 0:
            if not self._buffer and not self._fill(need):
                break
            piece, self._buffer = self._buffer[:need], self._buffer[need:]
            parts.append(piece)
            need -= len(piece)
        data = b"".join(parts)
        self.position += len(data)
        return data

    def read_exact(self, size: int, what: str = "data") -> bytes:
        data = self.read(size)
        if len(data) < size:
            raise DataError(
                f"{self.path}: file is truncated ({what} ends at byte {self.position} of the "
                f"{'decompressed ' if self.gzipped else ''}stream, its header needs "
                f"{self.position - len(data) + size})"
            )
        return data

    def skip_to(self, offset: int) -> None:
        """Go forward to ``offset`` (bytes in between are read and hashed, not kept)."""
        if offset < self.position:
            raise ValueError("cannot go back")
        while self.position < offset:
            self.read_exact(min(CHUNK, offset - self.position), "the header")

    def finish(self) -> str:
        """Check the stream holds nothing (much) more than read, and return the sha256. A gzip
        stream is inflated to its end (its CRC is checked there), at most ``SLACK`` further."""
        if self.gzipped:
            extra = 0
            while self._buffer or self._fill(SLACK):
                extra += len(self._buffer)
                self._buffer = b""
                if extra > SLACK:
                    raise DataError(
                        f"{self.path}: inflates beyond the {self.position:,} bytes its header "
                        f"gives (more than {SLACK // 2**20} MiB more: a gzip bomb, or not one "
                        "image); refused"
                    )
        return self.digest.hexdigest()

    def _fill(self, want: int) -> bool:
        """Inflate up to ``want`` more bytes into the buffer; False at the end of the stream."""
        while True:
            if self._inflate is None:  # between gzip members: another one, padding, or the end
                tail = self._pending or self._next_raw()
                self._pending = b""
                if not tail:
                    return False
                if tail[:2] != GZIP_MAGIC:
                    if tail.strip(b"\x00"):
                        raise DataError(f"{self.path}: data after the end of the gzip stream")
                    continue
                self._inflate = zlib.decompressobj(wbits=31)
                self._pending = tail
            if not self._pending:
                self._pending = self._next_raw()
                if not self._pending:
                    raise DataError(
                        f"{self.path}: file is truncated (the gzip stream ends before its end "
                        f"marker, after {self.position + len(self._buffer):,} bytes)"
                    )
            try:
                out = self._inflate.decompress(self._pending, max(1, want))
            except zlib.error as err:
                raise DataError(f"{self.path}: damaged gzip data ({err})") from None
            self._pending = self._inflate.unconsumed_tail
            if self._inflate.eof:
                self._pending = self._inflate.unused_data + self._pending
                self._inflate = None
            if out:
                self._buffer += out
                return True

    def _next_raw(self) -> bytes:
        size = min(CHUNK, self.size - self._raw)
        if size <= 0:
            return b""
        data = inputs.pread_exact(self.fd, size, self._raw, self.path)
        self.digest.update(data)
        self._raw += len(data)
        return data
