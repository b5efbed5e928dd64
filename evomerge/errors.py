"""The one exception type for problems the user can fix (bad config, missing model, bad value).

The CLI prints its message as one line and exits with code 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, described in one line."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message cut to one line (its type name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def non_finite_message(name: str, dtype: str) -> str:
    """Why a merged tensor holding NaN or infinity is refused, with what usually causes it."""
    return (
        f"merged tensor {name} is not finite (NaN or inf in {dtype.removeprefix('torch.')}); likely causes: "
        "weights that sum to about zero, a parameter too large for the dtype (lambda, r, scale), or a NaN "
        "or inf in a source model"
    )
