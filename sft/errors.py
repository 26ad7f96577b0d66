"""The one exception type for mistakes a user can fix; the CLI prints it as one line and exits 2."""

EXIT_USER_ERROR = 2
# EX_TEMPFAIL from sysexits.h: the batch script requeues the job when it sees this status.
EXIT_PREEMPTED = 75
# 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C.
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem with the user's config, data or environment: the message says what, where and how to fix."""
