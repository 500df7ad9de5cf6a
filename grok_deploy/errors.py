"""The one user-facing exception: `main()` prints it as `error: ...` and exits 2."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing or corrupt input, refused pickle...).

    The message is one line that names the file, key or value and says what to do.
    """
