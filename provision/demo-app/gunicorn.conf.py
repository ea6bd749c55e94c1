# One worker (prometheus_client's default registry is per process) and threads for concurrency.
import os

bind = os.environ.get("BIND", "0.0.0.0:8000")
workers = 1
threads = int(os.environ.get("THREADS", "8"))
timeout = 30
accesslog = "-"
