"""Observability: OpenTelemetry's asyncpg spans are children of the caller's span, whatever kind of caller.

Every call carries the caller's contextvars to the bridge loop (``Call.context``), and OpenTelemetry keeps
the current span in a contextvar: so a statement that runs on the bridge thread, on a loop the caller
never sees, is still traced as part of the caller's request. Real spans (the SDK, an in-memory exporter)
from ``opentelemetry-instrumentation-asyncpg``, on a real server.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, Tracer

from loopbridge import Database
from tests.support import all_at_once, in_thread, run_loop

#: The attribute holding the statement, in the old and in the stable database conventions.
STATEMENT_KEYS = ("db.statement", "db.query.text")


class Traced:
    """A tracer whose finished spans land in memory, and asyncpg instrumented to report to it."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer: Tracer = self.provider.get_tracer("loopbridge-tests")

    def statement_spans(self, statement: str) -> list[ReadableSpan]:
        return [
            span
            for span in self.exporter.get_finished_spans()
            if any(span.attributes and span.attributes.get(key) == statement for key in STATEMENT_KEYS)
        ]

    def only_statement_span(self, statement: str) -> ReadableSpan:
        spans = self.statement_spans(statement)
        assert len(spans) == 1, [span.name for span in self.exporter.get_finished_spans()]
        return spans[0]


@pytest.fixture
def traced() -> Iterator[Traced]:
    tracing = Traced()
    instrumentor = AsyncPGInstrumentor()
    instrumentor.instrument(tracer_provider=tracing.provider)
    try:
        yield tracing
    finally:
        instrumentor.uninstrument()
        tracing.provider.shutdown()


def as_caller(kind: str, tracer: Tracer, work: Callable[[], Any], awork: Callable[[], Any]) -> SpanContext:
    """Inside a span of the caller's own, run *work* (blocking) or await *awork* as this kind of caller;
    return that span's context."""

    if kind == "sync-thread":

        def in_a_thread() -> SpanContext:
            with tracer.start_as_current_span("request") as span:
                work()
                return span.get_span_context()

        return in_thread(in_a_thread)

    if kind == "foreign-loop":

        async def on_a_loop() -> SpanContext:
            with tracer.start_as_current_span("request") as span:
                await awork()
                return span.get_span_context()

        return run_loop(on_a_loop)

    async def blocking_inside_a_loop() -> SpanContext:
        asyncio.get_running_loop()
        with tracer.start_as_current_span("request") as span:
            work()
            return span.get_span_context()

    return run_loop(blocking_inside_a_loop)


def assert_child_of(span: ReadableSpan, parent: SpanContext) -> None:
    assert span.kind is SpanKind.CLIENT
    assert span.parent is not None, f"{span.name} has no parent: the caller's context did not cross"
    assert (span.parent.trace_id, span.parent.span_id) == (parent.trace_id, parent.span_id)
    assert span.context is not None
    assert span.context.trace_id == parent.trace_id


CALLERS = ["sync-thread", "foreign-loop", "running-loop-thread"]


@pytest.mark.parametrize("kind", CALLERS)
def test_a_statements_span_is_a_child_of_the_callers_span(traced: Traced, db: Database, kind: str) -> None:
    query = f"SELECT 42 AS {kind.replace('-', '_')}"
    parent = as_caller(kind, traced.tracer, lambda: db.fetchval(query), lambda: db.afetchval(query))
    assert_child_of(traced.only_statement_span(query), parent)


@pytest.mark.parametrize("kind", CALLERS)
def test_statements_in_a_transaction_are_children_of_the_callers_span(
    traced: Traced, db: Database, kind: str
) -> None:
    query = "SELECT 'in a transaction'"

    def work() -> None:
        with db.transaction() as tx:
            tx.fetchval(query)

    async def awork() -> None:
        async with db.transaction() as tx:
            await tx.afetchval(query)

    parent = as_caller(kind, traced.tracer, work, awork)
    assert_child_of(traced.only_statement_span(query), parent)


def test_concurrent_callers_each_get_their_own_parent(traced: Traced, db: Database) -> None:
    # Calls from many callers at once share the bridge loop and the pool's connections, never a context.
    parents: dict[str, SpanContext] = {}
    lock = threading.Lock()

    def caller(number: int) -> Callable[[], None]:
        def call() -> None:
            query = f"SELECT {number}, pg_sleep(0.05)"
            with traced.tracer.start_as_current_span(f"request {number}") as span:
                db.fetch(query)
            with lock:
                parents[query] = span.get_span_context()

        return call

    async def acaller(number: int) -> None:
        query = f"SELECT {number}, pg_sleep(0.05)"
        with traced.tracer.start_as_current_span(f"request {number}") as span:
            await db.afetch(query)
        with lock:
            parents[query] = span.get_span_context()

    def loop_of_callers() -> None:
        async def gathered() -> None:
            await asyncio.gather(*(acaller(number) for number in range(100, 108)))

        run_loop(gathered)

    all_at_once(*(caller(number) for number in range(8)), loop_of_callers)
    assert len(parents) == 16
    for query, parent in parents.items():
        assert_child_of(traced.only_statement_span(query), parent)


def test_a_statement_outside_any_span_starts_a_trace_of_its_own(traced: Traced, db: Database) -> None:
    # Nothing leaks from an earlier caller's context into a later one's.
    with traced.tracer.start_as_current_span("earlier request"):
        db.fetchval("SELECT 'earlier'")
    db.fetchval("SELECT 'later'")
    assert traced.only_statement_span("SELECT 'later'").parent is None


@pytest.mark.parametrize("kind", CALLERS)
def test_a_streams_cursor_spans_are_children_of_the_callers_span(
    traced: Traced, db: Database, kind: str
) -> None:
    # The cursor is read by a producer task on the bridge loop; it runs in the caller's context too.
    query = "SELECT g FROM generate_series(1, 10) AS g"

    def work() -> None:
        assert len(list(db.iterate(query, prefetch=3))) == 10

    async def awork() -> None:
        assert len([row async for row in db.iterate(query, prefetch=3)]) == 10

    parent = as_caller(kind, traced.tracer, work, awork)
    fetches = traced.statement_spans(query)
    assert len(fetches) >= 4  # 3 + 3 + 3 + 1 rows, and maybe an empty batch at the end
    for span in fetches:
        assert span.name.startswith("CURSOR")
        assert_child_of(span, parent)
