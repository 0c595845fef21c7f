"""loopbridge's benchmarks: ratios to native asyncpg, psycopg 3 and anyio, never timed tests.

Run ``python -m benchmarks`` (``--quick`` for the short CI run), and ``python -m benchmarks.apps`` for
whole web apps on real servers under wrk; see ``docs/performance.md``.
"""
