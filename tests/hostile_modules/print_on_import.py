"""Importing this module prints (to stdout and straight to file descriptor 1)."""

import os

from scenarios.runners import MoERunner

print("printed while importing")
os.write(1, b"fd-1 write while importing\n")


class Quiet(MoERunner):
    pass
