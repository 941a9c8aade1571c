#!/usr/bin/env python3
"""nccl-tests style all_gather benchmark; see bench/collectives.py for the options."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from collectives import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("all_gather"))
