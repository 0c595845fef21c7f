"""loopbridge's benchmarks: ratios to native asyncpg, psycopg 3 and anyio, never timed tests.

Run ``python -m benchmarks`` (``--quick`` for the short CI run); see ``benchmarks/NOTES.md``.
"""
