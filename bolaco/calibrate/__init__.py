"""Stage 1, calibration statistics (DESIGN 2.2): pooled covariances of every projection's input, collected block
by block on the calibration split and cached as self-verifying block files. `stream` runs one block at a time on
an execution device; the refit (decompose.closed_loop) streams blocks the same way."""

from .covariance import CovarianceCache, cache_bytes, cache_key, check_disk, collect, gram
from .stream import capture_block_inputs, execution_device, on_device, run_block

__all__ = ["CovarianceCache", "cache_bytes", "cache_key", "capture_block_inputs", "check_disk", "collect",
           "execution_device", "gram", "on_device", "run_block"]
