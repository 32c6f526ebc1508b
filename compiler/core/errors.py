"""Errors a user sees.

Every failure that is the user's to fix (a bad model file, an unsupported op,
NaN in calibration data, an unwritable output path) is a ``LowbitError``: the
CLI prints its one-line message and exits non-zero, with the traceback only
under ``--verbose``.
"""


class LowbitError(Exception):
    """Base class of every error lowbit reports to a user."""


class InputError(LowbitError):
    """The model, data or options given by the user cannot be used."""


class OptionError(InputError, ValueError):
    """A pass option has a value of the wrong type, or one the pass cannot use.

    The message names the pass (once known), the option, the value and what is wrong::

        pass 'smooth': option 'min_gain' = 'quarter' is not a float
    """

    def __init__(self, pass_name: str | None, option: str, value: object, problem: str):
        self.pass_name, self.option, self.value, self.problem = pass_name, option, value, problem
        where = f"pass {pass_name!r}: " if pass_name else ""
        super().__init__(f"{where}option {option!r} = {value!r} {problem}")

    def named(self, pass_name: str) -> "OptionError":
        """The same error, naming ``pass_name``."""
        return OptionError(pass_name, self.option, self.value, self.problem)


class PassFailedError(LowbitError):
    """A pass raised, or left a graph that fails verification."""

    def __init__(self, pass_name: str, after: list[str], cause: str):
        self.pass_name = pass_name
        self.after = after
        done = ", ".join(after) if after else "nothing"
        super().__init__(f"pass {pass_name} failed (after {done}): {cause}")


class CalibrationError(LowbitError):
    """Calibration data or statistics are unusable (NaN, empty, ...)."""


class AccuracyError(LowbitError):
    """The artifact misses an accuracy bound the user asked for (--max-drop)."""
