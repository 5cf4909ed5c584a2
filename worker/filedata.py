"""A worker's file-backed click-log batches: its files read on a background thread, a few batches ahead.

`FileBatchStream` yields one epoch of `CtrBatch`es from the files assigned to this worker
(`fileorder.assign_files`), in the order `fileorder` documents, holding at most `prefetch`
finished batches plus the one being assembled, however large the files. Files are read with
seek and read (no mmap), so what is resident is those batches, not the files.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from shardps.proto import records
from shardps.worker import fileorder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CtrBatch:
    """A batch of click-log rows: dense float32 [n, 13], categorical ids int64 [n, 26], labels float32 [n]."""

    dense: torch.Tensor
    cat: torch.Tensor
    label: torch.Tensor

    @staticmethod
    def from_records(rows: np.ndarray) -> CtrBatch:
        return CtrBatch(dense=torch.from_numpy(rows["dense"].astype(np.float32)),
                        # astype copies: a view of one packed row has strides torch refuses
                        cat=torch.from_numpy(rows["cat"].astype(np.int64)),
                        label=torch.from_numpy(rows["label"].astype(np.float32)))


@dataclass
class ReadStats:
    """What one worker has read, across epochs: the files it opened, bytes and rows, files skipped.

    Thread-safe: the reader thread adds, anyone may read. One per worker, passed to each
    epoch's stream, so a metric can show that a worker opens only its own files. A job of many
    epochs opens files without end: the lists keep the newest MAX_KEPT entries (the counts
    and `on_open` see every one).
    """

    MAX_KEPT = 100_000

    files_opened: list[str] = field(default_factory=list)
    bytes_read: int = 0
    rows_read: int = 0
    skipped: list[str] = field(default_factory=list)  # "path: problem" per skipped file
    on_open: Callable[[str], None] | None = field(default=None, repr=False, compare=False)  # e.g. a metric
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def opened(self, path: str) -> None:
        with self._lock:
            self.files_opened.append(path)
            if len(self.files_opened) > self.MAX_KEPT:
                del self.files_opened[: len(self.files_opened) - self.MAX_KEPT]
        if self.on_open is not None:
            self.on_open(path)

    def read(self, rows: int, nbytes: int) -> None:
        with self._lock:
            self.rows_read += rows
            self.bytes_read += nbytes

    def skip(self, error: records.DataFileError) -> None:
        with self._lock:
            self.skipped.append(str(error))
            if len(self.skipped) > self.MAX_KEPT:
                del self.skipped[: len(self.skipped) - self.MAX_KEPT]


_END = object()  # the reader finished the epoch


@dataclass(frozen=True)
class _Failure:
    error: BaseException


class FileBatchStream:
    """One epoch of one worker's batches, read ahead on a thread. Iterate it once; close() when done.

    Rows are this worker's files in the order given (pass `assign_files(...)[rank]`), each
    file's rows in `fileorder.block_order`, concatenated and cut every `batch_size` rows;
    the last short batch is kept unless `drop_last`. Before the first batch every file's
    header is checked; a bad file raises `records.DataFileError` naming it, in the consumer,
    or with `skip_bad` is left out and noted in `stats.skipped`. Every wait has a timeout:
    a consumer that gets no batch for `timeout_s` gets TimeoutError; a reader that cannot
    hand a batch over for `timeout_s` (the consumer went away without close()) stops.
    `skip_rows` starts the stream that many rows in, without reading them (a file wholly
    skipped is not opened): batch j of the epoch is the first batch after skip_rows = j *
    batch_size. The consumer side is for one thread.
    """

    def __init__(self, files: Sequence[str], batch_size: int, *, epoch: int = 0, seed: int = 0,
                 shuffle: bool = False, drop_last: bool = False, prefetch: int = 4, skip_bad: bool = False,
                 timeout_s: float = 60.0, stats: ReadStats | None = None, skip_rows: int = 0):
        if batch_size < 1 or prefetch < 1 or timeout_s <= 0 or skip_rows < 0:
            raise ValueError(f"need batch_size >= 1, prefetch >= 1, timeout_s > 0, skip_rows >= 0; got "
                             f"{batch_size}, {prefetch}, {timeout_s}, {skip_rows}")
        self.files = list(files)
        self.batch_size, self.epoch, self.seed = batch_size, epoch, seed
        self.shuffle, self.drop_last, self.skip_bad = shuffle, drop_last, skip_bad
        self.prefetch, self.timeout_s = prefetch, timeout_s
        self._skip = skip_rows  # rows of the epoch's sequence still to pass over unread (reader thread)
        self.stats = stats if stats is not None else ReadStats()
        self.max_ahead = 0  # most batches produced and not yet taken, ever (bounded by prefetch + 1)
        self._produced = 0
        self._consumed = 0
        self._count_lock = threading.Lock()
        self._queue: queue.Queue[object] = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="file-batch-reader", daemon=True)
        self._thread.start()

    @property
    def ahead(self) -> int:
        """Batches the reader has handed over and the consumer has not taken yet."""
        with self._count_lock:
            return self._produced - self._consumed

    def __iter__(self) -> FileBatchStream:
        return self

    def __next__(self) -> CtrBatch:
        if self._done:
            raise StopIteration
        try:
            item = self._queue.get(timeout=self.timeout_s)
        except queue.Empty:
            self.close()
            raise TimeoutError(f"no batch from the file reader in {self.timeout_s} s") from None
        if isinstance(item, CtrBatch):
            with self._count_lock:
                self._consumed += 1
            return item
        self.close()
        if isinstance(item, _Failure):
            raise item.error
        raise StopIteration

    def close(self) -> None:
        """Stops the reader and waits for it (at most timeout_s). Idempotent."""
        self._done = True
        self._stop.set()
        self._thread.join(timeout=self.timeout_s)

    def __enter__(self) -> FileBatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The reader thread.

    def _run(self) -> None:
        current = "(before the first file)"
        try:
            headers = self._headers()
            pending: list[np.ndarray] = []
            for header in headers:
                current = header.path
                left = self._read_file(header, pending)
                if left is None:
                    return
                pending = left
            rest = np.concatenate(pending) if pending else None
            if rest is not None and len(rest) and not self.drop_last:
                if not self._put(CtrBatch.from_records(rest)):
                    return
            self._put(_END)
        except records.DataFileError as e:
            self._put(_Failure(e))
        except Exception as e:  # a defect or an I/O error: the consumer hears it, naming the file
            failure = RuntimeError(f"{current}: file reader failed: {e!r}")
            failure.__cause__ = e
            self._put(_Failure(failure))

    def _headers(self) -> list[records.RecordFileHeader]:
        headers = []
        for path in self.files:
            try:
                headers.append(records.inspect(path, records.CTR_RECORD))
            except records.DataFileError as e:
                if not self.skip_bad:
                    raise
                self.stats.skip(e)
        return headers

    def _read_file(self, header: records.RecordFileHeader, pending: list[np.ndarray]) -> list[np.ndarray] | None:
        """Reads one file's blocks into batches; returns the rows left over, None if stopped."""
        blocks = self._unskipped(fileorder.block_order(header.path, header.rows, self.batch_size, self.epoch,
                                                       self.seed, self.shuffle))
        if not blocks:
            return pending
        try:
            with open(header.path, "rb") as f:
                # One line a file: a job's files are large, and the log shows who read what when.
                logger.info("reading %s (epoch %d)", header.path, self.epoch)
                self.stats.opened(header.path)
                for start, count in blocks:
                    rows = records.read_rows(f, header, start, count)
                    self.stats.read(count, rows.nbytes)
                    if not pending and count == self.batch_size:
                        batch = rows  # a whole block, the common case: no copy to join pieces
                    else:
                        pending.append(rows)
                        if sum(len(p) for p in pending) < self.batch_size:
                            continue
                        joined = np.concatenate(pending)
                        batch = joined[:self.batch_size]
                        pending = [joined[self.batch_size:]] if len(joined) > self.batch_size else []
                    if not self._put(CtrBatch.from_records(batch)):
                        return None
        except OSError as e:
            error = records.DataFileError(header.path, f"cannot read ({e.strerror or e})")
            if not self.skip_bad:
                raise error from None
            self.stats.skip(error)
        except records.DataFileError as e:
            if not self.skip_bad:
                raise
            self.stats.skip(e)
        return pending

    def _unskipped(self, blocks: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The (start, count) ranges left to read once the rows still to skip are passed over."""
        kept = []
        for start, count in blocks:
            passed = min(self._skip, count)
            self._skip -= passed
            if count > passed:
                kept.append((start + passed, count - passed))
        return kept

    def _put(self, item: object) -> bool:
        """Hands an item to the consumer; False if stopped or nobody took it within timeout_s."""
        deadline = time.monotonic() + self.timeout_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self._queue.put(item, timeout=0.05)
            except queue.Full:
                continue
            if isinstance(item, CtrBatch):
                with self._count_lock:
                    self._produced += 1
                    self.max_ahead = max(self.max_ahead, self._produced - self._consumed)
            return True
        return False

