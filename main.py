"""Compare default pruning with Intra-Fusion: `python main.py --help` (= `intrafusion grid`)."""
from intrafusion.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
