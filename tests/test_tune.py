"""The tuner's calibration (ccl/tune.py): `python -m pyccl.tune` measures real transports and writes
a profile; the cost model loads it; a communicator prices plans with rank 0's profile."""
import json
import os
import subprocess
import sys

import pytest

from pyccl import tune
from pyccl.topology import cost

pytestmark = pytest.mark.timeout(120)


def _profile(path, alpha=17.0, bw=3.5, red=9.0):
    tune.save({"tcp": {"alpha_us": alpha, "bw_gbs": bw, "reduce_gbs": red}}, str(path))
    return str(path)


def test_profile_loads_over_defaults_and_env_overrides_win(tmp_path):
    path = _profile(tmp_path / "p.json")
    c = cost.transport_costs({"PYCCL_TUNE_PROFILE": path})
    assert c["tcp"] == cost.LinkCost.of(17.0, 3.5, 9.0)
    assert c["shm"] == cost.DEFAULTS["shm"]                       # not in the profile: default
    c = cost.transport_costs({"PYCCL_TUNE_PROFILE": path, "PYCCL_ALPHA_TCP": "99"})
    assert c["tcp"].alpha == pytest.approx(99e-6) and c["tcp"].beta == pytest.approx(1 / 3.5e9)
    assert cost.transport_costs({"PYCCL_TUNE_PROFILE": "off"}) == cost.DEFAULTS
    assert cost.transport_costs({}) == cost.DEFAULTS               # an explicit env is a pure input
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cost.transport_costs({"PYCCL_TUNE_PROFILE": str(bad)}) == cost.DEFAULTS


def test_default_path_is_per_host_under_the_cache(tmp_path):
    p = tune.profile_path({"XDG_CACHE_HOME": str(tmp_path)})
    assert p.startswith(str(tmp_path / "pyccl" / "tune-")) and p.endswith(".json")


def test_fit_recovers_the_model():
    alpha, beta, gamma = 20e-6, 1 / 2e9, 1 / 8e9
    b = tune.LARGE / 2
    t_large = 2 * (b // tune.CHUNK) * alpha + 2 * b * beta + b * gamma
    f = tune.fit(2 * alpha, t_large, 8.0)
    assert f["alpha_us"] == pytest.approx(20.0) and f["bw_gbs"] == pytest.approx(2.0)


def test_fit_engine_recovers_the_model():
    alpha, beta, gamma = 4e-6, 1 / 6e9, 1 / 8e9
    b = tune.LARGE / 2
    f = tune.fit_engine(alpha, alpha + 2 * b * beta + b * gamma, 8.0)
    assert f["alpha_us"] == pytest.approx(4.0) and f["bw_gbs"] == pytest.approx(6.0)


def test_composed_local_phases_are_priced_on_the_engine():
    """A composed collective's node-local phases cost the engine's alpha, not the slot rings'."""
    from pyccl.topology import composed
    from pyccl.topology.graph import Topology
    topo = Topology.uniform(2, 2, "shm", "tcp")
    costs = dict(cost.DEFAULTS, shm=cost.LinkCost.of(25.0, 6.0, 8.0), shm_engine=cost.LinkCost.of(3.0, 6.0, 8.0))
    local = [p for p in composed.phases("all_reduce", 8, topo, costs) if p.scope == "local"]
    assert len(local) == 2 and all(p.seconds < 4e-6 for p in local), local
    del costs["shm_engine"]                   # without the entry: the intra transport, as before
    local = [p for p in composed.phases("all_reduce", 8, topo, costs) if p.scope == "local"]
    assert all(p.seconds >= 25e-6 for p in local), local


def test_tune_cli_measures_and_writes_a_profile(tmp_path):
    out = tmp_path / "prof.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYCCL_")}
    r = subprocess.run([sys.executable, "-m", "pyccl.tune", "--out", str(out), "--repeat", "1", "--iters", "3"],
                       env=env, capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    for name in ("shm", "tcp", "shm_engine"):
        v = data["transports"][name]
        assert v["alpha_us"] > 0 and v["bw_gbs"] > 0 and v["reduce_gbs"] > 0, v
    assert tune.load({"PYCCL_TUNE_PROFILE": str(out)}).keys() == {"shm", "tcp", "shm_engine"}
    show = subprocess.run([sys.executable, "-m", "pyccl.tune", "--show"], env=dict(env, PYCCL_TUNE_PROFILE=str(out)),
                          capture_output=True, text=True, timeout=60).stdout
    assert "(loaded)" in show and "measured" in show


def rank_costs(comm):
    c = comm.costs["tcp"]
    return c.alpha, c.beta


def test_communicator_prices_with_the_profile(tmp_path):
    from ranks import RankGroup
    path = _profile(tmp_path / "p.json", alpha=42.0, bw=0.5)
    g = RankGroup(2, env={"PYCCL_TUNE_PROFILE": path, "PYCCL_TRANSPORT": "tcp"})
    try:
        got = g.run(rank_costs)
    finally:
        g.close()
    assert all(a == pytest.approx(42e-6) and b == pytest.approx(2e-9) for a, b in got), got
