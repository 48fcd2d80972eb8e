"""The one exception type of the library: a ValueError whose message is one line a person can act
on. The command line prints it as `error: …` and exits with code 2."""


class IntraFusionError(ValueError):
    """Bad input (arguments, files, environment), stated so a person can fix it."""


def check_at_least(*checks) -> None:
    """IntraFusionError for the first (flag, value, least) whose value is below least (NaN too)."""
    for flag, value, least in checks:
        if not value >= least:
            raise IntraFusionError(f"{flag} must be at least {least}, got {value}")


def check_positive(flag: str, value: float) -> None:
    """IntraFusionError unless value is a finite number above 0."""
    if not (value > 0 and value != float("inf")):
        raise IntraFusionError(f"{flag} must be a positive number, got {value}")
