"""Importing this module calls sys.exit(7)."""

import sys

sys.exit(7)
