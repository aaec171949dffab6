"""Importing this module raises KeyboardInterrupt itself."""

raise KeyboardInterrupt
