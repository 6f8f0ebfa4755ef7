"""``migd serve``: the per-hypervisor daemon, in parts: its lifecycle (devices,
listeners, signals, systemd's notify and watchdog), the control server, and the
commands."""

from .lifecycle import Daemon, check_file_limit, file_limit_needed, load_identity, serve

__all__ = ["Daemon", "check_file_limit", "file_limit_needed", "load_identity", "serve"]
