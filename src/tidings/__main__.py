"""`python -m tidings`: the same command line as the `tidings` script."""

from .cli import main

if __name__ == "__main__":
    main()
