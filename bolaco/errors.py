"""The one exception type for mistakes a user can make: the CLI prints its message on one line (secrets masked)."""

import re


class BolacoError(Exception):
    """A user-caused problem (bad input, missing file, impossible budget) with a message that says what to do."""


class CacheError(BolacoError):
    """A cache on disk is corrupt or was built for different inputs."""


def mask_secrets(text: str) -> str:
    """`text` with the password of any URL in it replaced by ***: `scheme://user:PASSWORD@host`."""
    return re.sub(r"(\w[\w+.-]*://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)
