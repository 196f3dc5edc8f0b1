"""gunicorn entry point: `gunicorn bench.gunicorn_app:app --worker-class aiohttp.GunicornWebWorker ...`."""

from bench.apps import create_app

app = create_app()
