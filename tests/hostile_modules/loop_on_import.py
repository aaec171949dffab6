"""Importing this module never ends (runner loading executes user code)."""

while True:
    pass
