"""The process-wide start-up timeout of rank pools (the CLI's
--startup-timeout), kept apart from real/pool.py so that setting it does not
import torch: the CLI sets it while validating its flags, before it knows
whether ranks will start at all."""

from __future__ import annotations

# Start-up (spawn, import torch, rendezvous, init the group) under load can take
# tens of seconds on an oversubscribed CPU; it is bounded on its own.
DEFAULT_STARTUP_TIMEOUT_S = 120.0
_startup_timeout_s = DEFAULT_STARTUP_TIMEOUT_S


def set_default_startup_timeout(seconds: float) -> None:
    """The start-up timeout of every pool created without its own (the CLI's
    --startup-timeout); read when a pool (re)starts its ranks."""
    global _startup_timeout_s
    if not seconds > 0:
        raise ValueError(f"start-up timeout must be > 0 seconds, got {seconds}")
    _startup_timeout_s = float(seconds)


def default_startup_timeout() -> float:
    return _startup_timeout_s


__all__ = ["DEFAULT_STARTUP_TIMEOUT_S", "default_startup_timeout", "set_default_startup_timeout"]
