"""The ibverbs transport on real verbs (soft-RoCE, rdma_rxe), run inside a VM: CI runs it in VM a
of tests/rdma/two-vm.sh (on rxe0 over `lo`, before the tests across the link), and
tests/rdma/rxe-vm.sh boots a single VM for it alone: every collective, dtypes and odd sizes on 2-4 ranks, striping over
several QPs, credit wrap-around with many small messages, size mismatches, the MR cache, and
a peer killed mid-collective.  Outside the VM (no RDMA device) the RDMA tests skip with the
transport's reason; the ABI check and the "unavailable" behaviour run everywhere.

    tests/rdma/rxe-vm.sh                       # boots the VM, runs this file inside
    tests/rdma/rxe-vm.sh python -m pytest -q tests/rdma -k mismatch
"""
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import pyccl
from pyccl.errors import InvalidArgument, PeerFailure, TransportError
from pyccl.transports import ibverbs as ib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

sys.path.insert(0, os.path.dirname(HERE))          # tests/: reference.py, test_collectives.py
from reference import make  # noqa: E402
from test_collectives import (rank_all_to_all_uneven, rank_async_mix, rank_big_all_reduce,  # noqa: E402
                              rank_send_recv_barrier, rank_split)

OK, WHY = ib.available()
needs_rdma = pytest.mark.skipif(not OK, reason=f"no usable RDMA device here: {WHY}")
pytestmark = pytest.mark.timeout(600)

IB = {"transport": "ibverbs"}
SIZES = [0, 1, 7, 1031]
SETTINGS = {
    "default": {},
    # 3 QPs striping anything over 4 KiB, 512 B eager limit, 4 slots, depth 4 and 2 KiB chunks:
    # every path (eager, rendezvous, striped) and the credit rings wrap many times per call
    "tight": {"PYCCL_IB_QPS": "3", "PYCCL_IB_STRIPE_MIN": "4096", "PYCCL_IB_EAGER_BYTES": "512",
              "PYCCL_IB_SLOTS": "4", "PYCCL_IB_DEPTH": "4", "PYCCL_CHUNK_BYTES": "2048"},
}


def _group(groups, n, setting="default"):
    """Groups are shared by key: the same env dict for the same setting (startup is slow in
    the VM); the tests that break their group come last in this file."""
    return groups(n, env=SETTINGS[setting], **IB)


# ---- everywhere -----------------------------------------------------------------------------
def test_abi_matches_real_header(tmp_path):
    """native/ibverbs.h's own copy of the verbs ABI agrees with <infiniband/verbs.h>."""
    if os.environ.get("RXE_VM"):
        pytest.skip("checked on the host (compiling under emulation is slow)")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not os.path.exists("/usr/include/infiniband/verbs.h"):
        pytest.skip("needs a C compiler and libibverbs-dev's <infiniband/verbs.h>")
    src = tmp_path / "abi.c"
    src.write_text(_abi_source())
    native = os.path.join(os.path.dirname(os.path.dirname(HERE)), "native")
    r = subprocess.run([cc, "-std=gnu11", "-I", native, "-c", str(src), "-o", str(tmp_path / "abi.o")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def test_unavailable_is_explained():
    if OK:
        pytest.skip("an RDMA device is present")
    assert WHY and ("RDMA" in WHY or "libibverbs" in WHY or "_verbs" in WHY), WHY
    assert ib.local_rdma() == ""
    assert "unavailable" in ib.describe()
    assert ib.IbvTransport().can_connect({"host": "a", "rdma": ""}, {"host": "b", "rdma": "x:1/Ethernet"}) is False


def test_forced_but_unavailable_says_why():
    if OK:
        pytest.skip("an RDMA device is present")
    from pyccl.transports.base import SetupContext
    from pyccl.transports.select import connect_all
    ctx = SetupContext(0, 2, [0, 1], None, b"", "t", 1.0, info={0: {}, 1: {}})
    with pytest.raises(InvalidArgument, match="ibverbs.*unavailable"):
        connect_all(ctx, "ibverbs")


@pytest.mark.timeout(120)
def test_topology_cli_readable_and_json():
    """`python -m pyccl.topology` is readable text naming where the RDMA facts came from and
    what ibverbs would use; `--json` keeps the raw facts (plus rdma_ports) for scripts."""
    import json
    r = subprocess.run([sys.executable, "-m", "pyccl.topology", "--peer", "127.0.0.1"], capture_output=True,
                       text=True, timeout=100)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "RDMA ports (read with " in r.stdout and "transports:" in r.stdout, r.stdout
    assert ("ibverbs would use" in r.stdout) or not OK, r.stdout
    r = subprocess.run([sys.executable, "-m", "pyccl.topology", "--json"], capture_output=True, text=True, timeout=100)
    info = json.loads(r.stdout)
    assert {"host", "rdma", "net", "transports", "rdma_ports"} <= set(info), sorted(info)
    assert info["rdma_ports"]["source"] in ("pyverbs", "sysfs")
    assert [p["name"] for p in info["rdma"]] == sorted({p["device"] for p in info["rdma_ports"]["ports"]})


def _devs(*ports):
    return [{"name": f"d{i}", "ports": [{"port": 1, "state": st, "link_layer": ll, "rate": "", "netdevs": []}]}
            for i, (st, ll) in enumerate(ports)]


def test_selection_rule():
    t = ib.IbvTransport()
    a = {"host": "h1", "rdma": "mlx5_0:1/InfiniBand"}
    assert t.can_connect(a, {"host": "h2", "rdma": "mlx5_3:1/InfiniBand"})
    assert not t.can_connect(a, {"host": "h1", "rdma": "mlx5_0:1/InfiniBand"})      # same host: shm
    assert not t.can_connect(a, {"host": "h2", "rdma": "rxe0:1/Ethernet"})          # IB vs RoCE
    assert not t.can_connect(a, {"host": "h2"})                                      # peer has none
    # the topology's form (topology.detect.rdma_devices()): only ACTIVE ports count
    roce = {"host": "h1", "rdma": _devs(("4: ACTIVE", "Ethernet"))}
    assert t.can_connect(roce, {"host": "h2", "rdma": _devs(("1: DOWN", "InfiniBand"), ("4: ACTIVE", "Ethernet"))})
    assert not t.can_connect(roce, {"host": "h2", "rdma": _devs(("1: DOWN", "Ethernet"))})
    assert not t.can_connect(roce, {"host": "h2", "rdma": []})
    for x, y in [(roce, a), (a, roce)]:                                                # symmetric
        assert t.can_connect(x, dict(y, host="h9")) == t.can_connect(y, dict(x, host="h9"))


def test_cut_is_deterministic():
    assert ib._cut(0, 2, 64) == [(0, 0)]
    assert ib._cut(63, 2, 64) == [(0, 63)]
    parts = ib._cut(1031, 3, 64)
    assert len(parts) == 3 and sum(n for _, n in parts) == 1031
    assert [o for o, _ in parts] == [0, 343, 687]


# ---- the protocol over a loopback fake of the verbs calls (everywhere) -------------------------
try:
    import pyccl._verbs  # noqa: F401
    HAVE_VERBS_MODULE = True
except ImportError:
    HAVE_VERBS_MODULE = False
needs_module = pytest.mark.skipif(not HAVE_VERBS_MODULE, reason="pyccl._verbs is not built")


@needs_rdma
def test_describe_shows_the_chosen_gid():
    text = ib.describe()
    assert "available" in text and "<-" in text, text
    port, gidx, _ = ib.choose_port()
    if port["link_layer"].lower() == "ethernet":
        gtype = {i: t for i, _, t, _ in port["gids"]}[gidx]
        assert "v2" in gtype.lower(), text


def rank_p2p(comm, sizes, rounds):
    """Ring shift, several rounds of every size (eager and rendezvous)."""
    r, s = comm.rank, comm.size
    bad = []
    for n in sizes:
        outs = [make(r * 10 + k, n, "float64") for k in range(rounds)]
        ins = [np.zeros(n, np.float64) for _ in range(rounds)]
        for k in range(rounds):
            if r % 2 == 0:
                comm.send(outs[k], (r + 1) % s)
                comm.recv(ins[k], (r - 1) % s)
            else:
                comm.recv(ins[k], (r - 1) % s)
                comm.send(outs[k], (r + 1) % s)
        for k in range(rounds):
            if not np.array_equal(ins[k], make(((r - 1) % s) * 10 + k, n, "float64")):
                bad.append(f"p2p n={n} round {k}")
    return bad


def rank_every_collective(comm, sizes):
    """Every collective over every dtype and odd sizes (one reducing op per dtype and all
    five ops on float32/int32: the reduce kernels are tested elsewhere; here the bytes move
    over RDMA), checked against the float64 reference."""
    from pyccl.dtypes import DTYPES
    from reference import REDUCE_DTYPES, mismatch
    s, r = comm.size, comm.rank
    bad = []
    cases = [(d, "sum") for d in REDUCE_DTYPES] + [("bool", "max"), ("float32", "min"), ("float32", "prod"),
                                                  ("float32", "avg"), ("int32", "max")]
    for dtype, op in cases:
        for n in sizes:
            every = [make(q, n, dtype, op) for q in range(s)]
            x = every[r].copy()
            comm.all_reduce(x, op=getattr(pyccl, op.upper()))
            err = mismatch(x, every, op, dtype)
            if err:
                bad.append(f"all_reduce {dtype} {op} n={n}: {err}")
            root = (n + len(dtype)) % s
            x = every[r].copy()
            comm.reduce(x, root=root, op=op)
            if r == root and mismatch(x, every, op, dtype):
                bad.append(f"reduce {dtype} {op} n={n} root={root}: {mismatch(x, every, op, dtype)}")
            full = [make(q, n * s, dtype, op, salt=3) for q in range(s)]
            out = np.zeros(n, DTYPES[dtype])
            comm.reduce_scatter(out, full[r], op=op)
            err = mismatch(out, [f[r * n:(r + 1) * n] for f in full], op, dtype)
            if err:
                bad.append(f"reduce_scatter {dtype} {op} n={n}: {err}")
    for dtype in DTYPES:
        for n in sizes:
            every = [make(q, n, dtype) for q in range(s)]
            root = (n + 1) % s
            x = every[r].copy()
            comm.broadcast(x, root=root)
            if not np.array_equal(x.view(np.uint8), every[root].view(np.uint8)):
                bad.append(f"broadcast {dtype} n={n}")
            out = np.zeros(n * s, DTYPES[dtype])
            comm.all_gather(out, every[r])
            if not np.array_equal(out.view(np.uint8), np.concatenate(every).view(np.uint8)):
                bad.append(f"all_gather {dtype} n={n}")
            g = np.zeros(n * s, DTYPES[dtype]) if r == root else None
            comm.gather(g, every[r], root=root)
            if r == root and not np.array_equal(g.view(np.uint8), np.concatenate(every).view(np.uint8)):
                bad.append(f"gather {dtype} n={n}")
            full = make(root, n * s, dtype, salt=1)
            part = np.zeros(n, DTYPES[dtype])
            comm.scatter(part, full if r == root else None, root=root)
            if not np.array_equal(part.view(np.uint8), full[r * n:(r + 1) * n].view(np.uint8)):
                bad.append(f"scatter {dtype} n={n}")
            src = make(r, n * s, dtype, salt=2)
            dst = np.zeros(n * s, DTYPES[dtype])
            comm.all_to_all(dst, src)
            want = np.concatenate([make(q, n * s, dtype, salt=2)[r * n:(r + 1) * n] for q in range(s)])
            if not np.array_equal(dst.view(np.uint8), want.view(np.uint8)):
                bad.append(f"all_to_all {dtype} n={n}")
    return bad


@needs_rdma
@pytest.mark.parametrize("nranks,setting", [(2, "default"), (3, "default"), (4, "default"), (3, "tight")])
def test_every_collective(groups, nranks, setting):
    """The rxe run: describe, point-to-point, every collective x dtype x odd sizes, uneven
    all_to_all, send/recv, barrier, async ops, split, a 16 MiB all_reduce, all on one group
    (starting ranks is slow in the emulated VM)."""
    g = _group(groups, nranks, setting)
    assert g.run(rank_transport_used) == [["IbvConnection"]] * nranks
    assert not any(g.run(rank_p2p, [0, 1, 7, 4099, 70001], 2))
    failures = [f for rank_bad in g.run(rank_every_collective, SIZES) for f in rank_bad]
    assert not failures, failures[:20]
    for n in (0, 5, 17):
        assert not any(g.run(rank_all_to_all_uneven, n))
        assert not any(g.run(rank_send_recv_barrier, n))
    assert not any(g.run(rank_async_mix))
    assert not any(g.run(rank_split))
    if setting == "default" and nranks != 3:
        assert not any(g.run(rank_big_all_reduce, 16))


def rank_transport_used(comm):
    """The transport chosen for every peer (connections open lazily: open them all first)."""
    comm.conns.open_all()
    return sorted({type(c).__name__ for c in comm.conns.values()})


_AUTO_SCRIPT = """
import os, sys
os.environ["PYCCL_HOST_ID"] = "fake-host-" + os.environ["PYCCL_RANK"]   # two "hosts", one rxe device
os.environ.pop("PYCCL_TRANSPORT", None)
import numpy as np, pyccl
comm = pyccl.init()
x = np.full(1000, comm.rank + 1.0)
comm.all_reduce(x)
kinds = sorted({type(c).__name__ for c in comm.conns.values()})
has = ["yes" if i.get("rdma") else "no" for i in comm.peer_info]
line = " ".join(["RESULT", str(comm.rank), ",".join(kinds), "|".join(has), str(float(x[0]))])
os.write(1, (line + chr(10)).encode())     # one write: lines of the two ranks never interleave
comm.close()
"""


@needs_rdma
def test_auto_selects_ibverbs_between_hosts(tmp_path):
    """Without PYCCL_TRANSPORT, ranks on different hosts (PYCCL_HOST_ID) that both have an RDMA
    port talk over ibverbs (select.py's rule); needs the communicator to exchange `rdma`."""
    script = tmp_path / "auto.py"
    script.write_text(_AUTO_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYCCL_TRANSPORT"}
    r = subprocess.run([sys.executable, "-m", "pyccl.launch", "-n", "2", str(script)], env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("RESULT")]
    assert len(rows) == 2, r.stdout
    if "no" in rows[0][3]:
        pytest.skip("the communicator does not put RDMA devices into its bootstrap info")
    assert all(row[2] == "IbvConnection" and float(row[4]) == 3.0 for row in rows), rows


def rank_mr_cache(comm):
    """Registrations are reused for slices and repeated calls, and die with their array."""
    x = np.arange(1 << 16, dtype=np.float32)
    comm.all_reduce(x)                      # opens the connections this plan needs
    conn = next(iter(comm.conns.values()))
    cache = conn.dev.mrs
    misses = cache.misses
    for _ in range(3):
        comm.all_reduce(x)
    bad = []
    if cache.misses != misses:
        bad.append(f"repeated all_reduce on one array registered again ({cache.misses - misses} misses)")
    y = np.ones(1 << 16, np.float32)
    comm.all_reduce(y)
    if cache.misses == misses:
        bad.append("a new array was not registered")
    del y
    import gc
    gc.collect()
    comm.all_reduce(x)                     # reaps dead entries
    if any(e.dead for e in cache.entries):
        bad.append("an entry of a freed array is still registered")
    return bad


@needs_rdma
def test_mr_cache(groups):
    g = _group(groups, 2)
    assert not any(g.run(rank_mr_cache))


def rank_size_mismatch(comm, base):
    if comm.rank > 1:
        return "idle"
    x = np.zeros(base + base // 2 * comm.rank, np.uint8)
    try:
        if comm.rank == 0:
            comm.send(x, 1)
        else:
            comm.recv(x, 0)
    except (TransportError, PeerFailure, pyccl.errors.Timeout) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


@needs_rdma
@pytest.mark.parametrize("base", [100, 1 << 20], ids=["eager", "rendezvous"])
def test_size_mismatch_names_the_peer(groups, base):
    """Rank 0 sends `base` bytes, rank 1 expects 1.5x: the side that sees the sizes names the
    other rank and both sizes; the other side gets an error too (never a hang)."""
    # the last users of these groups (2 and 4 ranks): they end broken
    g = _group(groups, 2 if base == 100 else 4)
    t0 = time.monotonic()
    out = g.run(rank_size_mismatch, base)[:2]
    g.broken = True
    want = [f"size mismatch with rank {1 - r}" for r in range(2)]
    assert any(w in o for w, o in zip(want, out)), out
    if base == 100:                         # one eager message each: both sizes are named
        assert "100" in out[1] and "150" in out[1], out
    if base > 100:                          # a rendezvous send waits for the receiver: both fail
        assert all(o.startswith(("TransportError", "PeerFailure")) for o in out), out
    assert time.monotonic() - t0 < 45, out


def rank_die_mid_collective(comm, victim):
    x = np.ones(1 << 20, np.float32)
    comm.all_reduce(x)                      # connections warm
    if comm.rank == victim:
        time.sleep(0.5)
        os._exit(17)
    t0 = time.monotonic()
    try:
        for _ in range(1000):
            comm.all_reduce(x)
    except (PeerFailure, TransportError, pyccl.errors.Timeout) as e:
        text = f"{type(e).__name__} after {time.monotonic() - t0:.1f}s: {e}"
    else:
        return "no error"
    new = comm.shrink(timeout=10)           # the survivors go on over ibverbs
    y = np.full(1001, comm.rank + 1.0)
    new.all_reduce(y)
    new.close()
    return f"{text} | shrunk to {new.size}: {y[0]:g} {y[-1]:g}"


@needs_rdma
@pytest.mark.parametrize("nranks", [3])
def test_peer_killed_mid_collective(groups, nranks):
    victim = nranks - 1
    g = _group(groups, nranks)
    for pipe in g.pipes:
        pipe.send((rank_die_mid_collective, (victim,)))
    answers = {}
    for r, pipe in enumerate(g.pipes):
        if r == victim:
            continue
        assert pipe.poll(90), f"rank {r} hung after rank {victim} died"
        kind, value = pipe.recv()
        assert kind == "ok", value
        answers[r] = value
    g.procs[victim].join(10)
    g.broken = True
    assert g.procs[victim].exitcode == 17
    for r, text in answers.items():
        assert text.startswith(("PeerFailure", "TransportError")), answers
        # the rank next to the victim names it; others may name the neighbour that gave up
        assert "rank" in text, answers
    assert any(f"rank {victim}" in t for t in answers.values()), answers
    survivors_sum = sum(r + 1 for r in range(nranks) if r != victim)
    assert all(t.endswith(f"| shrunk to {nranks - 1}: {survivors_sum} {survivors_sum}") for t in answers.values()), answers
    assert all(float(t.split(" after ")[1].split("s")[0]) < 30 for t in answers.values()), answers


# ---- the ABI check source -------------------------------------------------------------------
_FIELDS = {
    "ibv_context": ["device", "ops", "cmd_fd", "async_fd", "num_comp_vectors", "abi_compat"],
    "ibv_context_ops": ["poll_cq", "req_notify_cq", "post_send", "post_recv"],
    "ibv_comp_channel": ["context", "fd", "refcnt"],
    "ibv_cq": ["context", "channel", "cq_context", "handle", "cqe"],
    "ibv_qp": ["context", "qp_context", "pd", "send_cq", "recv_cq", "srq", "handle", "qp_num", "state",
               "qp_type"],
    "ibv_mr": ["context", "pd", "addr", "length", "handle", "lkey", "rkey"],
    "ibv_wc": ["wr_id", "status", "opcode", "vendor_err", "byte_len", "imm_data", "qp_num", "src_qp",
               "wc_flags", "pkey_index", "slid", "sl", "dlid_path_bits"],
    "ibv_sge": ["addr", "length", "lkey"],
    "ibv_send_wr": ["wr_id", "next", "sg_list", "num_sge", "opcode", "send_flags", "imm_data",
                    "wr.rdma.remote_addr", "wr.rdma.rkey"],
    "ibv_recv_wr": ["wr_id", "next", "sg_list", "num_sge"],
    "ibv_qp_cap": ["max_send_wr", "max_recv_wr", "max_send_sge", "max_recv_sge", "max_inline_data"],
    "ibv_qp_init_attr": ["qp_context", "send_cq", "recv_cq", "srq", "cap", "qp_type", "sq_sig_all"],
    "ibv_global_route": ["dgid", "flow_label", "sgid_index", "hop_limit", "traffic_class"],
    "ibv_ah_attr": ["grh", "dlid", "sl", "src_path_bits", "static_rate", "is_global", "port_num"],
    "ibv_qp_attr": ["qp_state", "cur_qp_state", "path_mtu", "path_mig_state", "qkey", "rq_psn", "sq_psn",
                    "dest_qp_num", "qp_access_flags", "cap", "ah_attr", "alt_ah_attr", "pkey_index",
                    "alt_pkey_index", "en_sqd_async_notify", "sq_draining", "max_rd_atomic",
                    "max_dest_rd_atomic", "min_rnr_timer", "port_num", "timeout", "retry_cnt",
                    "rnr_retry", "alt_port_num", "alt_timeout", "rate_limit"],
    "ibv_port_attr": ["state", "max_mtu", "active_mtu", "gid_tbl_len", "port_cap_flags", "max_msg_sz",
                      "pkey_tbl_len", "lid", "sm_lid", "lmc", "link_layer", "flags", "port_cap_flags2"],
}
_SIZED = ["ibv_sge", "ibv_send_wr", "ibv_recv_wr", "ibv_wc", "ibv_qp_cap", "ibv_qp_init_attr", "ibv_qp_attr",
          "ibv_ah_attr", "ibv_global_route", "ibv_context_ops"]
_ENUMS = ["QPT_RC", "QPS_RESET", "QPS_INIT", "QPS_RTR", "QPS_RTS", "QPS_ERR", "WR_RDMA_WRITE",
          "WR_RDMA_WRITE_WITH_IMM", "SEND_SIGNALED", "ACCESS_LOCAL_WRITE", "ACCESS_REMOTE_WRITE",
          "ACCESS_REMOTE_READ", "QP_STATE", "QP_ACCESS_FLAGS", "QP_PKEY_INDEX", "QP_PORT", "QP_AV",
          "QP_PATH_MTU", "QP_TIMEOUT", "QP_RETRY_CNT", "QP_RNR_RETRY", "QP_RQ_PSN", "QP_MAX_QP_RD_ATOMIC",
          "QP_MIN_RNR_TIMER", "QP_SQ_PSN", "QP_MAX_DEST_RD_ATOMIC", "QP_DEST_QPN", "WC_RECV_RDMA_WITH_IMM",
          "LINK_LAYER_ETHERNET"]
# constants transports/ibverbs/verbs.py hard-codes
_PY_CONSTANTS = {"IBV_WC_WR_FLUSH_ERR": ib._WC_WR_FLUSH_ERR, "IBV_WC_RETRY_EXC_ERR": ib._WC_RETRY_EXC_ERR,
                 "IBV_WC_RNR_RETRY_EXC_ERR": ib._WC_RNR_RETRY_EXC_ERR,
                 "IBV_WC_REM_ACCESS_ERR": ib._WC_REM_ACCESS_ERR, "IBV_PORT_ACTIVE": ib._PORT_ACTIVE,
                 "IBV_WC_RECV_RDMA_WITH_IMM": ib._WC_RECV_RDMA_WITH_IMM,
                 "IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE": ib._ACCESS_FULL}


def _abi_source() -> str:
    out = ["#include <stddef.h>", "#include <infiniband/verbs.h>", '#include "ibverbs.h"']
    for s, fields in _FIELDS.items():
        for f in fields:
            out.append(f'_Static_assert(offsetof(struct {s}, {f}) == offsetof(struct pv_{s}, {f}), "{s}.{f}");')
    for s in _SIZED:
        out.append(f'_Static_assert(sizeof(struct {s}) == sizeof(struct pv_{s}), "sizeof {s}");')
    out.append('_Static_assert(sizeof(union ibv_gid) == sizeof(union pv_ibv_gid), "gid");')
    out.append('_Static_assert(sizeof(struct ibv_port_attr) <= sizeof(struct pv_ibv_port_attr), "port");')
    for e in _ENUMS:
        out.append(f'_Static_assert(IBV_{e} == PV_IBV_{e}, "{e}");')
    for expr, value in _PY_CONSTANTS.items():
        out.append(f'_Static_assert(({expr}) == {value}, "{expr}");')
    return "\n".join(out) + "\n"
