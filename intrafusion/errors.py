"""The one exception type of the library: a ValueError whose message is one line a person can act
on. The command line prints it as `error: …` and exits with code 2."""


class IntraFusionError(ValueError):
    """Bad input (arguments, files, environment), stated so a person can fix it."""
