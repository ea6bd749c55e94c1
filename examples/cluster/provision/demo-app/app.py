"""Demo app for the monitoring lab: a few endpoints with Prometheus metrics.

Metrics (all prefixed ``demo_``):
- ``demo_http_requests_total{method, endpoint, status}``: the endpoint label is the URL rule (``/slow``), never
  the raw path, so label cardinality stays bounded whatever clients request.
- ``demo_http_request_duration_seconds{method, endpoint}``: histogram whose buckets cover ``/slow``.
- ``demo_http_requests_in_flight``: gauge of requests being served.
- ``demo_alert_notifications_total{status}``: Alertmanager notifications received on ``POST /alerts``.

``/metrics`` is served by prometheus_client's own WSGI app (DispatcherMiddleware), so scrapes are not counted.
Runs under gunicorn with ONE worker and several threads (the default registry is per process).
"""

import json
import logging
import os
import random
import time

from flask import Flask, g, jsonify, request
from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app
from werkzeug.middleware.dispatcher import DispatcherMiddleware

SLOW_MIN = float(os.environ.get("SLOW_MIN_SECONDS", "0.5"))
SLOW_MAX = float(os.environ.get("SLOW_MAX_SECONDS", "1.5"))

REQUESTS = Counter(
    "demo_http_requests", "HTTP requests served, by URL rule and status", ["method", "endpoint", "status"]
)
LATENCY = Histogram(
    "demo_http_request_duration_seconds",
    "Time to serve a request, by URL rule",
    ["method", "endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0),
)
IN_FLIGHT = Gauge("demo_http_requests_in_flight", "Requests being served right now")
ALERTS = Counter("demo_alert_notifications", "Alertmanager notifications received", ["status"])

app = Flask(__name__)
app.secret_key = os.environ.get("SECRET_KEY") or os.urandom(32)
log = logging.getLogger("demo-app")
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")


@app.before_request
def _start():
    g.t0 = time.perf_counter()
    IN_FLIGHT.inc()


@app.after_request
def _record(response):
    rule = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    LATENCY.labels(request.method, rule).observe(time.perf_counter() - g.t0)
    REQUESTS.labels(request.method, rule, str(response.status_code)).inc()
    return response


@app.teardown_request
def _done(_exc):
    IN_FLIGHT.dec()


@app.route("/")
def index():
    return jsonify(app="demo-app", endpoints=["/", "/error", "/slow", "/health", "/metrics", "/alerts"])


@app.route("/error")
def error():
    return jsonify(error="simulated failure"), 500


@app.route("/slow")
def slow():
    delay = random.uniform(SLOW_MIN, SLOW_MAX)
    time.sleep(delay)
    return jsonify(slept_seconds=round(delay, 3))


@app.route("/health")
def health():
    return jsonify(status="ok")


@app.route("/alerts", methods=["POST"])
def alerts():
    """Default Alertmanager webhook receiver: logs every notification."""
    body = request.get_json(silent=True) or {}
    status = body.get("status", "unknown")
    ALERTS.labels(status).inc()
    names = sorted({a.get("labels", {}).get("alertname", "?") for a in body.get("alerts", [])})
    log.info("alert notification status=%s alerts=%s", status, json.dumps(names))
    return jsonify(received=len(body.get("alerts", [])))


app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/metrics": make_wsgi_app()})
