"""A minimal Django project using ``loopbridge.contrib.django``: sync and async views, WSGI and ASGI."""
