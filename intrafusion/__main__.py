"""`python -m intrafusion <command> …`: the same as the `intrafusion` console command."""
from .cli import package_main

if __name__ == "__main__":
    raise SystemExit(package_main())
