"""Helpers shared by the tests (synthetic profiles, ...)."""
