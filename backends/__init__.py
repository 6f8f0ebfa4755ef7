"""Device backends: the host-side drivers of a VF's migration state.

Importing this package registers every built-in kind in :data:`REGISTRY`.
"""

from . import hisi as _hisi  # noqa: F401  (each module registers its kind)
from . import mlx5 as _mlx5  # noqa: F401
from . import sim as _sim  # noqa: F401
from . import vfio as _vfio  # noqa: F401
from .base import REGISTRY, Device, PrecopyInfo
from .states import DeviceState, MigCap

__all__ = ["REGISTRY", "Device", "DeviceState", "MigCap", "PrecopyInfo"]
