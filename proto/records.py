"""Record files: the on-disk format of file-backed datasets, shared by writers and readers.

A shard file is one standard NumPy `.npy` array, 1-D, of a structured (record) dtype: one
record per row, rows stored back to back. A reader validates the header and the file size,
then reads any row range with one seek and one read, so memory stays at the rows it asked for.
`docs/data.md` says why this format. NumPy only (no torch): the client writes these files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

MANIFEST = "manifest.json"           # a dataset directory's description of its files
MANIFEST_FORMAT = "shardps.records/1"  # its "format": this module's files and that manifest
DENSE_FEATURES = 13        # Criteo's integer features
CATEGORICAL_FEATURES = 26  # Criteo's categorical features

# One click-log row, little-endian and packed (261 bytes):
CTR_RECORD = np.dtype([
    ("label", "<u1"),                               # 1 = clicked, 0 = not
    ("dense", "<i4", (DENSE_FEATURES,)),            # non-negative counts, like Criteo's I1-I13
    ("cat", "<i8", (CATEGORICAL_FEATURES,)),        # hashed categorical ids over the int64 range
])


class DataFileError(ValueError):
    """A data file that cannot be used; the message starts with the file's path."""

    def __init__(self, path: str | os.PathLike[str], problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass(frozen=True)
class RecordFileHeader:
    """A validated record file: `rows` records of `dtype` starting at byte `offset`."""

    path: str
    rows: int
    dtype: np.dtype
    offset: int

    @property
    def nbytes(self) -> int:
        return self.offset + self.rows * self.dtype.itemsize


def describe(dtype: np.dtype) -> list[dict[str, object]]:
    """The schema as JSON-friendly fields: name, NumPy type string and per-row shape."""
    described: list[dict[str, object]] = []
    for name in dtype.names or ():
        field = dtype[name]
        described.append({"name": name, "type": field.base.str, "shape": list(field.shape)})
    return described


def inspect(path: str | os.PathLike[str], expected: np.dtype) -> RecordFileHeader:
    """Open, check and close a record file; DataFileError naming the file if it is unusable.

    Checks: it exists and is readable, it is a `.npy` array, 1-D, C order, of exactly the
    `expected` record dtype (else a schema mismatch), and its size is header + rows * record
    size (else truncated or padded). The data bytes themselves carry no checksum.
    """
    try:
        with open(path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            except (ValueError, SyntaxError, EOFError) as e:
                raise DataFileError(path, f"not a NumPy .npy file ({e})") from None
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise DataFileError(path, "no such file") from None
    except IsADirectoryError:
        raise DataFileError(path, "is a directory, not a file") from None
    except PermissionError:
        raise DataFileError(path, "permission denied") from None
    except OSError as e:
        raise DataFileError(path, f"cannot read ({e.strerror or e})") from None
    if dtype != expected:
        raise DataFileError(path, f"schema mismatch: fields {describe(dtype)}, expected {describe(expected)}")
    if len(shape) != 1 or fortran:
        raise DataFileError(path, f"expected a 1-D array of records, got shape {shape}")
    header = RecordFileHeader(str(path), int(shape[0]), dtype, offset)
    if size != header.nbytes:
        raise DataFileError(path, f"corrupt: {size} bytes on disk, the header promises {header.nbytes} "
                                  f"({header.rows} rows of {dtype.itemsize} bytes)")
    return header


def read_rows(f: BinaryIO, header: RecordFileHeader, start: int, count: int) -> np.ndarray:
    """Rows [start, start + count) of an open record file, as a fresh read-only record array."""
    if start < 0 or count < 0 or start + count > header.rows:
        raise ValueError(f"rows [{start}, {start + count}) outside the file's {header.rows}")
    f.seek(header.offset + start * header.dtype.itemsize)
    data = f.read(count * header.dtype.itemsize)
    if len(data) != count * header.dtype.itemsize:
        raise DataFileError(header.path, f"corrupt: file ended inside row {start + len(data) // header.dtype.itemsize}")
    return np.frombuffer(data, dtype=header.dtype)


class RecordFileWriter:
    """Writes one record file in chunks: header first, rows appended, renamed into place on close.

    The file appears under its name only once all `rows` rows are written (a crash leaves a
    `.tmp` file, never a short shard). Not thread-safe; one writer per file.
    """

    def __init__(self, path: str | os.PathLike[str], dtype: np.dtype, rows: int):
        self.path = Path(path)
        self.dtype = dtype
        self.rows = rows
        self.written = 0
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._f = open(self._tmp, "wb")  # closed by close() or abort()
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows,)}
        np.lib.format.write_array_header_2_0(self._f, header)

    def write(self, records: np.ndarray) -> None:
        if records.dtype != self.dtype or records.ndim != 1:
            raise ValueError(f"expected 1-D records of {self.dtype}, got {records.dtype} {records.shape}")
        if self.written + len(records) > self.rows:
            raise ValueError(f"{self.path}: {self.written + len(records)} rows written, the header says {self.rows}")
        self._f.write(np.ascontiguousarray(records).tobytes())
        self.written += len(records)

    def close(self) -> None:
        """Finish the file; ValueError (and no file) if fewer rows came than promised."""
        if self.written != self.rows:
            self.abort()
            raise ValueError(f"{self.path}: {self.written} rows written, the header says {self.rows}")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)
