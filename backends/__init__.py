"""Device backends: the host-side drivers of a VF's migration state.

Importing this package registers every built-in kind in :data:`REGISTRY`.
"""

from . import sim as _sim  # noqa: F401  (registers "sim")
from .base import REGISTRY, Device, PrecopyInfo
from .states import DeviceState, MigCap

__all__ = ["REGISTRY", "Device", "DeviceState", "MigCap", "PrecopyInfo"]
