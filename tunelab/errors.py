"""The one exception type for user mistakes.

Raise ``TunelabError("what is wrong ... do this instead")`` for anything a user can fix (bad
path, bad flag, unsupported combination). The CLI prints it as one line without a traceback
(``--debug`` shows it) and exits non-zero. Use ``assert`` only for internal invariants.
"""


class TunelabError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""
