"""``python -m middleware``: the profile viewer CLI (see :mod:`middleware.cli`)."""
import sys

from middleware.cli import main

sys.exit(main())
