"""Emulated hardware behind the drivers in ``backends``: what a real host has in
silicon and firmware, here so that the drivers can be written as the kernel's are."""
