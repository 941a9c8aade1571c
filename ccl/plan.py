"""python -m pyccl.plan: build, verify, cost and draw collective plans for a simulated
cluster (see pyccl.topology.plan_cli)."""
import sys

from pyccl.topology.plan_cli import main

if __name__ == "__main__":
    sys.exit(main())
