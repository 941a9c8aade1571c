#!/usr/bin/env python3
"""nccl-tests style reduce_scatter benchmark; see bench/collectives.py for the options."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from collectives import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("reduce_scatter"))
