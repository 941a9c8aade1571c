"""The tuner's calibration profile, read: where it lives and what it says.

`python -m pyccl.tune` (ccl/tune.py, a command-line tool) measures each transport's alpha,
bandwidth and reduction bandwidth and writes them as JSON, per host, under
~/.cache/pyccl/tune-<hostname>.json (PYCCL_TUNE_PROFILE=path for another file, =off for
none). Reading it is here, in topology/, because the cost model (cost.transport_costs and
cost.measured_costs, which turn it into LinkCosts), the bootstrap (rank 0 shares its profile)
and the communicator need it and must not import the measuring tool above them.
"""
import json
import logging
import os
import socket

from pyccl import settings

log = logging.getLogger("pyccl")

FIELDS = ("alpha_us", "bw_gbs", "reduce_gbs")


def profile_path(env=None) -> str:
    """Where this host's profile lives ('' when profiles are off)."""
    env = os.environ if env is None else env
    path = settings.get("PYCCL_TUNE_PROFILE", env) or ""
    if path.lower() in ("off", "0", "none"):
        return ""
    if path:
        return os.path.expanduser(path)
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pyccl", f"tune-{socket.gethostname()}.json")


def load(env=None) -> dict:
    """{transport: {alpha_us, bw_gbs, reduce_gbs}} from the profile, {} when there is none
    (or it is unreadable: then a warning says why and the defaults stand)."""
    path = profile_path(env)
    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
        out = {}
        for name, v in data["transports"].items():
            vals = [float(v[k]) for k in FIELDS]
            if all(x > 0 for x in vals):
                out[name] = dict(zip(FIELDS, vals))
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("pyccl: tuner profile %s unreadable (%s); using the default costs", path, e)
        return {}

