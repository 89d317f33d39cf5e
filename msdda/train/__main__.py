"""``python -m msdda.train --config X [key=value ...]``: the entry point for ``accelerate launch``."""

import sys

from msdda.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
