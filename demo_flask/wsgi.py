"""WSGI entry point: ``gunicorn wsgi:app`` (run from demo_flask/, config in gunicorn.conf.py)."""

from app import app

__all__ = ["app"]
