# One worker (prometheus_client's default registry is per process) and threads for concurrency.
import os

bind = os.environ.get("BIND", "0.0.0.0:8000")
workers = 1
threads = int(os.environ.get("THREADS", "8"))
# Import the app once in the master: a worker then boots at once. Under software emulation importing Flask and
# prometheus_client takes longer than gunicorn's default 30 s worker timeout, which killed workers in a loop.
preload_app = True
timeout = 120
accesslog = "-"
