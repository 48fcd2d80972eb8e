"""`python -m intrafusion plot results/x.csv`: the package's command line (see cli.package_main)."""
from .cli import package_main

if __name__ == "__main__":
    raise SystemExit(package_main())
