"""The one exception type for problems the user can fix (bad config, missing model, bad value).

The CLI prints its message as one line and exits with code 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, described in one line."""
