"""The one exception type for mistakes a user can make: the CLI prints its message on one line."""


class BolacoError(Exception):
    """A user-caused problem (bad input, missing file, impossible budget) with a message that says what to do."""


class CacheError(BolacoError):
    """A cache on disk is corrupt or was built for different inputs."""
