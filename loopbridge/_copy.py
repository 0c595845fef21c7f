"""COPY across the boundary: the server's side runs on the bridge loop, the file's side in the caller.

::

    db.copy_records_to_table("events", records=rows)                   # any iterable of tuples
    db.copy_to_table("events", source="events.csv", format="csv")      # a path, file, iterable of bytes
    with open("dump.bin", "wb") as f:
        db.copy_from_query("SELECT * FROM events WHERE day = $1", day, output=f, format="binary")

asyncpg would call a file object's ``read``/``write`` in its executor threads, and iterate a records
generator on its own loop: in loopbridge that is the bridge loop, shared by every caller, and the
caller's objects (a file, a generator reading a socket, an aiofiles handle bound to the caller's loop)
do not belong there. So the COPY runs on the bridge loop as a task of its own, and the caller's side
does the I/O: it reads its source in chunks and sends them through a bounded pipe (waiting when the
server is slower), or it receives the chunks of a COPY TO and writes them to its output. An async
caller awaits its own file objects on its own loop and crosses to the bridge loop per chunk.

A COPY is one statement: when it fails (or the caller's side fails, or is interrupted) nothing of it is
kept. asyncpg's errors reach the caller unchanged; ``timeout=`` bounds the whole COPY.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import inspect
import io
import itertools
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, Union

from asyncpg.pool import PoolConnectionProxy

from ._limits import call_timeout
from ._owner import abandon_soon
from ._pipe import End, Pipe, PipeClosed
from .errors import CallTimeoutError, LoopBridgeError

if TYPE_CHECKING:
    from .bridge import Bridge

__all__ = ["CHUNK_SIZE", "CopyMethods"]

T = TypeVar("T")

#: Bytes read from a source per chunk sent across.
CHUNK_SIZE = 256 * 1024
#: Records per chunk sent across, when records come from an iterator rather than a list.
RECORDS_PER_CHUNK = 2000
#: Chunks a pipe holds: the caller and the server each run this far ahead of the other.
PIPE_CHUNKS = 4

PathLike = Union[str, "os.PathLike[str]"]
Work = Callable[[PoolConnectionProxy, Pipe[Any]], Awaitable[str]]


class CopySource(Protocol):
    """What a COPY runs on: a Database (a pooled connection) or a Transaction (its connection)."""

    @property
    def bridge(self) -> Bridge: ...

    def _lease(self) -> contextlib.AbstractAsyncContextManager[PoolConnectionProxy]: ...


class CopyMethods:
    """COPY in both directions, shared by :class:`~loopbridge.Database` and
    :class:`~loopbridge.Transaction`. Keyword names follow asyncpg's."""

    __slots__ = ()

    # -- records into a table -----------------------------------------------------------------------

    def copy_records_to_table(
        self: CopySource,
        table_name: str,
        *,
        records: Iterable[Sequence[Any]],
        columns: Sequence[str] | None = None,
        schema_name: str | None = None,
        where: str | None = None,
        timeout: float | None = None,
    ) -> str:
        """Copy *records* (tuples, in column order) into a table with binary COPY; return the status
        (``'COPY 3'``).

        A list or tuple crosses as it is. Any other iterable (a generator, a cursor of another
        database) is read here, in the calling thread, and sent across in chunks: it is never run on
        the bridge loop, and only a few chunks are in memory at once.

        :raises CallTimeoutError: if *timeout* expired; nothing was copied.
        :raises Exception: what iterating *records* raised, or asyncpg's error; either way nothing was copied.
        """
        job = _Job(self, "copy_records_to_table", timeout)
        work = functools.partial(_records_in, table_name, columns, schema_name, where)
        if isinstance(records, (list, tuple)):
            return job.run(
                functools.partial(_records_at_once, table_name, columns, schema_name, where, records)
            )
        return job.feed(work, _chunked(iter(records)))

    async def acopy_records_to_table(
        self: CopySource,
        table_name: str,
        *,
        records: Iterable[Sequence[Any]] | AsyncIterable[Sequence[Any]],
        columns: Sequence[str] | None = None,
        schema_name: str | None = None,
        where: str | None = None,
        timeout: float | None = None,
    ) -> str:
        """:meth:`copy_records_to_table` for async code, from any loop; *records* may also be an async
        iterable (iterated on your loop, never on the bridge loop)."""
        job = _Job(self, "acopy_records_to_table", timeout)
        work = functools.partial(_records_in, table_name, columns, schema_name, where)
        if isinstance(records, (list, tuple)):
            return await job.arun(
                functools.partial(_records_at_once, table_name, columns, schema_name, where, records)
            )
        if isinstance(records, AsyncIterable):
            return await job.afeed(work, _achunked(records.__aiter__()))
        return await job.afeed(work, _as_async(_chunked(iter(records))))

    # -- a file (or bytes) into a table -------------------------------------------------------------

    def copy_to_table(
        self: CopySource,
        table_name: str,
        *,
        source: PathLike | Any,
        columns: Sequence[str] | None = None,
        schema_name: str | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> str:
        """COPY data into a table from *source*: a path, a file object opened for reading (binary or
        text), an iterable of ``bytes`` chunks, or a ``bytes`` object. Return the status.

        The file is read here, in the calling thread, in chunks of :data:`CHUNK_SIZE` bytes.
        *options* are COPY's (``format='csv'``, ``header=True``, ``delimiter``, ``null``, ``where``,
        ...), as asyncpg's ``copy_to_table`` takes them.

        :raises TypeError: if *source* is none of those (or an async file, which needs the async twin).
        :raises CallTimeoutError: if *timeout* expired; nothing was copied.
        :raises Exception: what reading *source* raised, or asyncpg's error; either way nothing was copied.
        """
        job = _Job(self, "copy_to_table", timeout)
        work = functools.partial(_bytes_in, table_name, columns, schema_name, options)
        with _opened(source, "rb") as readable:
            return job.feed(work, _read_chunks(readable))

    async def acopy_to_table(
        self: CopySource,
        table_name: str,
        *,
        source: PathLike | Any,
        columns: Sequence[str] | None = None,
        schema_name: str | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> str:
        """:meth:`copy_to_table` for async code, from any loop. *source* may also be an async file
        object (``await source.read(n)``, e.g. aiofiles) or an async iterable of ``bytes``; both are
        used on your loop. A path or a plain file is read with blocking calls on your loop."""
        job = _Job(self, "acopy_to_table", timeout)
        work = functools.partial(_bytes_in, table_name, columns, schema_name, options)
        with _opened(source, "rb") as readable:
            return await job.afeed(work, _aread_chunks(readable))

    # -- a query or a table out to a file -----------------------------------------------------------

    def copy_from_query(
        self: CopySource,
        query: str,
        *args: Any,
        output: PathLike | Any,
        timeout: float | None = None,
        **options: Any,
    ) -> str:
        """COPY the result of *query* (with *args*) to *output*: a path, a file object opened for
        writing (binary, or text for the text formats), or a function taking ``bytes``. Return the
        status (``'COPY 1000'``).

        The output is written here, in the calling thread, chunk by chunk as the server sends them;
        the server waits while the writing lags. *options* are COPY's (``format='csv'``,
        ``header=True``, ...).

        :raises TypeError: if *output* is none of those, or is a text file for ``format='binary'``.
        :raises CallTimeoutError: if *timeout* expired (the output holds what arrived before).
        :raises Exception: what writing to *output* raised, or asyncpg's error.
        """
        job = _Job(self, "copy_from_query", timeout)
        work = functools.partial(_query_out, query, args, options)
        with _opened(output, "wb") as writable:
            return job.drain(work, _writer(writable, options))

    async def acopy_from_query(
        self: CopySource,
        query: str,
        *args: Any,
        output: PathLike | Any,
        timeout: float | None = None,
        **options: Any,
    ) -> str:
        """:meth:`copy_from_query` for async code, from any loop. *output* may also be an async file
        object or an async function taking ``bytes``; they are awaited on your loop."""
        job = _Job(self, "acopy_from_query", timeout)
        work = functools.partial(_query_out, query, args, options)
        with _opened(output, "wb") as writable:
            return await job.adrain(work, _writer(writable, options))

    def copy_from_table(
        self: CopySource,
        table_name: str,
        *,
        output: PathLike | Any,
        columns: Sequence[str] | None = None,
        schema_name: str | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> str:
        """COPY a table (or some of its *columns*) to *output*, as :meth:`copy_from_query` does."""
        job = _Job(self, "copy_from_table", timeout)
        work = functools.partial(_table_out, table_name, columns, schema_name, options)
        with _opened(output, "wb") as writable:
            return job.drain(work, _writer(writable, options))

    async def acopy_from_table(
        self: CopySource,
        table_name: str,
        *,
        output: PathLike | Any,
        columns: Sequence[str] | None = None,
        schema_name: str | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> str:
        """:meth:`copy_from_table` for async code, from any loop."""
        job = _Job(self, "acopy_from_table", timeout)
        work = functools.partial(_table_out, table_name, columns, schema_name, options)
        with _opened(output, "wb") as writable:
            return await job.adrain(work, _writer(writable, options))


# -- the work, on the bridge loop: asyncpg's COPY, fed from or drained into the pipe ---------------


async def _records_at_once(
    table_name: str,
    columns: Sequence[str] | None,
    schema_name: str | None,
    where: str | None,
    records: Sequence[Sequence[Any]],
    con: PoolConnectionProxy,
    pipe: Pipe[Any],
) -> str:
    return await con.copy_records_to_table(
        table_name, records=records, columns=columns, schema_name=schema_name, where=where
    )


async def _records_in(
    table_name: str,
    columns: Sequence[str] | None,
    schema_name: str | None,
    where: str | None,
    con: PoolConnectionProxy,
    pipe: Pipe[list[Sequence[Any]]],
) -> str:
    async def records() -> AsyncIterator[Sequence[Any]]:
        while not isinstance(chunk := await pipe.get(), End):
            for record in chunk:
                yield record

    return await con.copy_records_to_table(
        table_name, records=records(), columns=columns, schema_name=schema_name, where=where
    )


async def _bytes_in(
    table_name: str,
    columns: Sequence[str] | None,
    schema_name: str | None,
    options: dict[str, Any],
    con: PoolConnectionProxy,
    pipe: Pipe[bytes],
) -> str:
    async def chunks() -> AsyncIterator[bytes]:
        while not isinstance(chunk := await pipe.get(), End):
            yield chunk

    return await con.copy_to_table(
        table_name, source=chunks(), columns=columns, schema_name=schema_name, **options
    )


async def _query_out(
    query: str, args: tuple[Any, ...], options: dict[str, Any], con: PoolConnectionProxy, pipe: Pipe[bytes]
) -> str:
    return await con.copy_from_query(query, *args, output=pipe.put, **options)


async def _table_out(
    table_name: str,
    columns: Sequence[str] | None,
    schema_name: str | None,
    options: dict[str, Any],
    con: PoolConnectionProxy,
    pipe: Pipe[bytes],
) -> str:
    return await con.copy_from_table(
        table_name, output=pipe.put, columns=columns, schema_name=schema_name, **options
    )


# -- one COPY: a task on the bridge loop, and the caller's side of its pipe ------------------------

_COPY_INSTEAD = "await the async twin (await db.acopy_to_table(...), ...), which feeds the COPY from there"

Direction = Literal["in", "out"]


class _Job:
    """One COPY: its task on the bridge loop and its pipe. The caller drives it: start, feed or drain
    the pipe, then collect the result (or abort)."""

    __slots__ = ("bridge", "label", "pipe", "source", "task", "timeout")

    def __init__(self, source: CopySource, name: str, timeout: float | None) -> None:
        self.source = source
        self.bridge = source.bridge
        self.label = f"{type(source).__name__}.{name}()"
        self.timeout = None if timeout is None else call_timeout(timeout, self.label)
        self.pipe: Pipe[Any] | None = None
        self.task: asyncio.Task[str] | None = None

    # -- sync callers

    def run(self, work: Work) -> str:
        """The whole COPY in one crossing: nothing of the caller's is needed on the way."""
        self.bridge._run(self._start, (work, "in"), None, None, self.label)
        return self._finish()

    def feed(self, work: Work, chunks: Iterator[Any]) -> str:
        self.bridge._run(self._start, (work, "in"), None, None, self.label)
        pipe = self.pipe
        assert pipe is not None
        try:
            for chunk in chunks:
                pipe.send(self.bridge, chunk, None, _COPY_INSTEAD)
            pipe.finish()
        except PipeClosed:  # the COPY ended early (it failed): _finish says why
            pass
        except BaseException as exc:  # reading the source failed, or Ctrl-C
            self._abort(exc)
            raise
        return self._finish()

    def drain(self, work: Work, write: Callable[[bytes], object]) -> str:
        self.bridge._run(self._start, (work, "out"), None, None, self.label)
        pipe = self.pipe
        assert pipe is not None
        try:
            while not isinstance(chunk := pipe.receive(self.bridge, None, _COPY_INSTEAD), End):
                write(chunk)
        except BaseException as exc:  # writing the output failed, or Ctrl-C
            self._abort(exc)
            raise
        return self._finish()

    def _finish(self) -> str:
        result: str = self.bridge._run(self._result, (), None, None, self.label)
        return result

    def _abort(self, error: BaseException) -> None:
        # First make the COPY fail (a reader that saw a plain end would complete it and keep half the
        # data), then wait for it to be gone.
        if self.pipe is not None:
            self.pipe.close(_CallerFailed(f"{self.label}: the caller's side failed: {error!r}"))
        if isinstance(error, Exception):  # wait, so that the connection is back when the error is seen
            with contextlib.suppress(LoopBridgeError):  # the bridge closed: that ended the COPY too
                self.bridge._run(self._cancel, (), None, None, self.label)
        else:  # Ctrl-C: do not make an interrupted caller wait again
            abandon_soon(self.bridge, self, "interrupted")

    # -- async callers

    async def arun(self, work: Work) -> str:
        await self.bridge._arun(self._start, (work, "in"), None, None, self.label)
        return await self._afinish()

    async def afeed(self, work: Work, chunks: AsyncIterator[Any]) -> str:
        await self.bridge._arun(self._start, (work, "in"), None, None, self.label)
        pipe = self.pipe
        assert pipe is not None
        try:
            async for chunk in chunks:
                await pipe.asend(self.bridge, chunk, None)
            pipe.finish()
        except PipeClosed:
            pass
        except BaseException as exc:
            await self._aabort(exc)
            raise
        return await self._afinish()

    async def adrain(self, work: Work, write: Callable[[bytes], object]) -> str:
        await self.bridge._arun(self._start, (work, "out"), None, None, self.label)
        pipe = self.pipe
        assert pipe is not None
        try:
            while not isinstance(chunk := await pipe.areceive(self.bridge, None), End):
                written = write(chunk)
                if inspect.isawaitable(written):
                    await written
        except BaseException as exc:
            await self._aabort(exc)
            raise
        return await self._afinish()

    async def _afinish(self) -> str:
        result: str = await self.bridge._arun(self._result, (), None, None, self.label)
        return result

    async def _aabort(self, error: BaseException) -> None:
        if self.pipe is not None:
            self.pipe.close(_CallerFailed(f"{self.label}: the caller's side failed: {error!r}"))
        if isinstance(error, Exception):
            with contextlib.suppress(LoopBridgeError):
                await self.bridge._arun(self._cancel, (), None, None, self.label)
        else:  # the awaiting task was cancelled: it must not wait again
            abandon_soon(self.bridge, self, "cancelled")

    # -- on the bridge loop

    async def _start(self, work: Work, direction: Direction) -> None:
        self.pipe = Pipe(PIPE_CHUNKS, self.label)
        self.task = asyncio.get_running_loop().create_task(self._copy(work, self.pipe, direction))
        self.task.add_done_callback(_retrieve)

    async def _copy(self, work: Work, pipe: Pipe[Any], direction: Direction) -> str:
        try:
            async with self.source._lease() as con:
                if self.timeout is None:
                    return await work(con, pipe)
                try:
                    return await asyncio.wait_for(work(con, pipe), self.timeout)
                except (asyncio.TimeoutError, TimeoutError):
                    raise CallTimeoutError(
                        f"{self.label} did not finish within {self.timeout:g} s; it was cancelled on "
                        "the bridge loop and nothing of it was kept"
                    ) from None
        finally:
            # A COPY TO has sent everything there is: the caller reads the rest, then the end. A COPY
            # FROM takes nothing more: the caller's next send raises, and it collects the result.
            if direction == "out":
                pipe.finish()
            else:
                pipe.close()

    async def _result(self) -> str:
        # Not shielded: a caller interrupted here (Ctrl-C, a cancelled task) cancels the COPY.
        assert self.task is not None
        return await self.task

    async def _cancel(self) -> None:
        task = self.task
        if task is not None:
            task.cancel()
            await asyncio.wait((task,))

    async def _abandon_on_bridge(self, why: str) -> None:
        await self._cancel()


def _retrieve(task: asyncio.Task[str]) -> None:
    # A caller that stopped waiting (it raises its own error) never collects the COPY's: keep asyncio
    # from logging it as never retrieved.
    if not task.cancelled():
        task.exception()


class _CallerFailed(Exception):
    """Raised into a COPY FROM on the bridge loop when the caller's side failed: the COPY must fail."""


# -- the caller's side: reading sources, writing outputs --------------------------------------------


@contextlib.contextmanager
def _opened(target: Any, mode: str) -> Iterator[Any]:
    """A path is opened (and closed) here, in the caller's thread; anything else is used as given."""
    if isinstance(target, (str, os.PathLike)):
        with open(target, mode) as file:
            yield file
    else:
        yield target


def _read_chunks(source: Any) -> Iterator[bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield bytes(source)
        return
    read = getattr(source, "read", None)
    if read is not None:
        while chunk := read(CHUNK_SIZE):
            if inspect.isawaitable(chunk):
                _close_awaitable(chunk)
                raise TypeError(
                    f"{type(source).__name__}.read() is async: pass this file to the async twin "
                    "(await db.acopy_to_table(...)), or open the file without aiofiles"
                )
            yield _as_bytes(chunk)
        return
    if isinstance(source, str) or not isinstance(source, Iterable):
        raise TypeError(_bad_source(source))
    for chunk in source:
        yield _as_bytes(chunk)


async def _aread_chunks(source: Any) -> AsyncIterator[bytes]:
    if isinstance(source, AsyncIterable):
        async for chunk in source:
            yield _as_bytes(chunk)
        return
    read = getattr(source, "read", None)
    if read is None:
        for chunk in _read_chunks(source):
            yield chunk
        return
    while True:
        chunk = read(CHUNK_SIZE)
        if inspect.isawaitable(chunk):
            chunk = await chunk
        if not chunk:
            return
        yield _as_bytes(chunk)


def _as_bytes(chunk: object) -> bytes:
    if isinstance(chunk, str):
        return chunk.encode()  # asyncpg's connections always use UTF-8 on the wire
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return bytes(chunk)
    raise TypeError(f"COPY data must be bytes (or str), not {type(chunk).__name__}")


def _writer(output: Any, options: dict[str, Any]) -> Callable[[bytes], object]:
    """A function writing one chunk to *output*; for a text file, decoding UTF-8 across chunks."""
    write = getattr(output, "write", None)
    if write is None:
        if callable(output):
            writer: Callable[[bytes], object] = output
            return writer
        raise TypeError(
            f"output must be a path, a file object opened for writing, or a function taking bytes; "
            f"not {type(output).__name__}"
        )
    if not _is_text(output):
        return write  # type: ignore[no-any-return]
    if options.get("format") == "binary":
        raise TypeError(
            "format='binary' writes bytes, but the output is a text file: open it in binary mode "
            "(open(path, 'wb')) or use format='text' or 'csv'"
        )
    decoder = codecs.getincrementaldecoder("utf-8")()

    def write_text(chunk: bytes) -> object:
        return write(decoder.decode(chunk))

    return write_text


def _is_text(output: object) -> bool:
    return isinstance(output, io.TextIOBase) or "b" not in getattr(output, "mode", "b")


def _chunked(records: Iterator[T]) -> Iterator[list[T]]:
    while chunk := list(itertools.islice(records, RECORDS_PER_CHUNK)):
        yield chunk


async def _achunked(records: AsyncIterator[T]) -> AsyncIterator[list[T]]:
    chunk: list[T] = []
    async for record in records:
        chunk.append(record)
        if len(chunk) >= RECORDS_PER_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def _as_async(items: Iterator[T]) -> AsyncIterator[T]:
    for item in items:
        yield item


def _close_awaitable(value: object) -> None:
    close = getattr(value, "close", None)
    if inspect.iscoroutine(value) and close is not None:
        close()


def _bad_source(source: object) -> str:
    return (
        "source must be a path, a file object opened for reading, an iterable of bytes chunks or a bytes "
        f"object; not {type(source).__name__}"
    )
