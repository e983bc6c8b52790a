"""The Flask demo: two endpoints, one of which hides a factorial-time bottleneck.

The only profiler code is the two tracker lines below; the tracker labels every request's samples
with its Flask route (``endpoint=/calculate2/<int:number>``) by itself. They come before the Flask
import on purpose: the tracker hooks Flask when it is imported later (either order works).

Run it with ``gunicorn wsgi:app`` from this directory (see ``gunicorn.conf.py``) or ``make demo``.
"""

from middleware import MwTracker

tracker = MwTracker()

from flask import Flask, jsonify  # noqa: E402  (after the tracker on purpose, see above)
from flask.typing import ResponseReturnValue  # noqa: E402

from calculations import efficient, with_bottleneck  # noqa: E402

# Inputs above these bounds would keep a worker busy for longer than gunicorn's timeout
# (calc3 is factorial: 10 takes about a second, 11 about fifteen).
MAX_EFFICIENT = 3000
MAX_BOTTLENECK = 10

app = Flask(__name__)


@app.route("/calculate1/<int:number>")
def calculate1(number: int) -> ResponseReturnValue:
    """Quadratic work only."""
    if number > MAX_EFFICIENT:
        return jsonify(error=f"number must be <= {MAX_EFFICIENT}"), 400
    return jsonify(number=number, result=efficient(number))


@app.route("/calculate2/<int:number>")
def calculate2(number: int) -> ResponseReturnValue:
    """Quadratic work plus the factorial bottleneck (calc3)."""
    if number > MAX_BOTTLENECK:
        return jsonify(error=f"number must be <= {MAX_BOTTLENECK}"), 400
    return jsonify(number=number, result=with_bottleneck(number))


@app.errorhandler(404)
def not_found(error: Exception) -> ResponseReturnValue:
    """Unknown paths get a JSON 404 that lists the real endpoints."""
    return (
        jsonify(error="not found", endpoints=["/calculate1/<int:number>", "/calculate2/<int:number>"]),
        404,
    )
