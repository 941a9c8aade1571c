"""`python -m pyccl.topology`: print what this machine looks like to pyccl."""
import sys

from .detect import main

sys.exit(main())
