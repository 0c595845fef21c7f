"""``python -m benchmarks.apps``: whole web apps on real servers (uvicorn, gunicorn) loaded by ``wrk``,
loopbridge against each framework's usual way of reaching PostgreSQL. See docs/performance.md, "Real
apps".

The app modules here are imported by the servers; the runner is ``__main__.py``. Nothing heavy is
imported by this package itself, so that each server loads only what its app needs.
"""
