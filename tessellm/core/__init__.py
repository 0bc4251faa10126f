"""Hardware-neutral engine core."""
