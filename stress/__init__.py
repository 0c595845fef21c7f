"""The stress suite: one Database under mixed load and injected faults, and proof that nothing was lost.

Run it from the repository root::

    python -m stress                      # 60 s against a private cluster it starts (and restarts)
    python -m stress --duration 25        # the short pass CI runs
    python -m stress --pgbouncer          # the same load through a PgBouncer in transaction mode
    python -m stress --replicas           # reads through db.read on hot standbys, a failover midway

It is not part of the unit-test run (``pytest`` collects only ``tests/``). See ``stress/run.py`` for what
runs, ``stress/faults.py`` for what goes wrong on purpose and ``stress/verify.py`` for what is checked.
"""
