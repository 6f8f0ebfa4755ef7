"""migd: live-migration stream daemon for SR-IOV virtual functions."""

__version__ = "0.1.0"
