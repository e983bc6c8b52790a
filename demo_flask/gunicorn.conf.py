"""gunicorn settings for the demo (read automatically when gunicorn starts in demo_flask/).

Command-line flags override these, e.g. ``gunicorn --bind 127.0.0.1:9000 --preload``.
Nothing here is needed for profiling: the tracker in app.py restarts its sampler in every forked
worker by itself, with or without ``--preload``.
"""

wsgi_app = "wsgi:app"
bind = "127.0.0.1:8000"  # loopback only
workers = 2
worker_class = "sync"
timeout = 30
# On SIGTERM workers finish their request and exit normally, which is when the tracker writes
# (or uploads) its last profile; leave them time for that.
graceful_timeout = 15
loglevel = "info"
accesslog = None
