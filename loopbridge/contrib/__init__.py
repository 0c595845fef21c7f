"""Integrations with frameworks and tools. Each is optional and imported only when used:

* ``loopbridge.contrib.starlette``: a lifespan that opens (and closes) a Database, and a dependency that
  hands it to handlers; for Starlette and FastAPI (``pip install 'loopbridge[starlette]'``).
* ``loopbridge.contrib.fastapi``: the same, plus ``DatabaseDep`` for handler signatures
  (``pip install 'loopbridge[fastapi]'``).
* ``loopbridge.contrib.django``: a Django app building the Databases (and ``loopbridge.sqlalchemy``
  Engines) named in ``settings.LOOPBRIDGE``, following a ``DATABASES`` alias to the test database
  (``pip install 'loopbridge[django]'``).
* ``loopbridge.contrib.flask``: a Flask extension, one Database (or Engine) per process
  (``pip install 'loopbridge[flask]'``).
* ``loopbridge.contrib.pytest_plugin``: fixtures for tests, a test rolled back for a Database or an
  Engine (registered with pytest automatically).

Importing ``loopbridge`` imports none of them, so none of the frameworks is ever a dependency.
"""

__all__: list[str] = []
