"""Exceptions shared by the kernel registry and the kernel modules.

Kept in a leaf module so kernel modules can raise them without importing the
registry (and the registry can re-export them without importing the kernels).
"""

from __future__ import annotations


class KernelUnavailable(Exception):
    """The kernel exists but cannot run here (missing device, package or driver)."""


class UnknownKernel(ValueError):
    """A kernel name that is not in the registry."""
