"""Exceptions. A `BnfoldError` is misuse or bad input: its message says what is wrong and how to fix it,
and the command line prints it as one line and exits 2. Anything else escaping the library is a bug."""


class BnfoldError(Exception):
    """Bad input or misuse; the message is one line naming the problem and the fix."""


class InvalidStatisticsError(BnfoldError):
    """A BatchNorm carries non-finite parameters or running_var + eps <= 0."""


class VerificationFailed(Exception):
    """A check ran and failed (exit 1, not 2): the folded model does not match the original. Nothing was
    written. ``result`` holds the :class:`bnfold.verify.VerifyResult`."""

    def __init__(self, result):
        super().__init__(result.verdict())
        self.result = result


class InternalError(RuntimeError):
    """bnfold produced something invalid from a valid input: a bug (exit 3), never blamed on the input."""


class Terminated(BaseException):
    """SIGTERM arrived (the command line's handler raises it so that ``finally`` blocks clean up; exit 143).
    A BaseException, like KeyboardInterrupt, so that ``except Exception`` does not swallow it."""

    def __init__(self, signum: int = 15):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum
