"""Stage 1, calibration statistics (docs/design.md, "Collect"): pooled covariances of every projection's input,
collected block by block on the calibration split and cached as self-verifying block files. `stream` runs one
block at a time on an execution device; the refit (decompose.closed_loop) streams blocks the same way."""

from .covariance import CovarianceCache, Moments, ShiftedSums, cache_bytes, cache_key, check_disk, collect
from .stream import capture_block_inputs, execution_device, input_of, on_device, run_block

__all__ = ["CovarianceCache", "Moments", "ShiftedSums", "cache_bytes", "cache_key", "capture_block_inputs",
           "check_disk", "collect", "execution_device", "input_of", "on_device", "run_block"]
