"""Several "hosts" on one machine: Linux network namespaces joined by a bridge and veths.

Host i lives in namespace `pyccl-h<i>-<tag>` with address 10.<net>.0.<i+1>; the root
namespace holds the bridge at 10.<net>.0.254, where the rendezvous store listens. Ranks
of host i run under `ip netns exec` with PYCCL_HOST_ID=host<i>, so pyccl treats them as
one machine (shared memory inside) and the others as remote (TCP over the veths).
Everything is removed on exit, also when a test fails.
"""
import itertools
import os
import secrets
import shutil
import subprocess
import sys

from pyccl.store import StoreServer


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def available():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False, "needs root and iproute2 to create network namespaces"
    probe = f"pyccl-probe-{os.getpid()}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return False, f"ip netns add failed: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return True, ""


_INSTANCES = itertools.count()


class Hosts:
    """`with Hosts(3) as h: h.run(script, ranks_per_host=2, env=...)`"""

    def __init__(self, nhosts: int, net: int = 77):
        self.n = nhosts
        # unique per instance: deleting a namespace frees its veths asynchronously, so the next
        # Hosts of this process must not reuse the names
        self.tag = f"{os.getpid() % 10000}{next(_INSTANCES) % 100}"
        self.net = net
        self.bridge = f"pbr{self.tag}"
        self.names = [f"pyccl-h{i}-{self.tag}" for i in range(nhosts)]
        self.store_ip = f"10.{net}.0.254"

    def __enter__(self):
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.store_ip}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, ns in enumerate(self.names):
                _ip("netns", "add", ns)
                inside, outside = self.interface(i), f"ph{i}o{self.tag}"
                _ip("link", "add", inside, "type", "veth", "peer", "name", outside)
                _ip("link", "set", inside, "netns", ns)
                _ip("link", "set", outside, "master", self.bridge)
                _ip("link", "set", outside, "up")
                _ip("-n", ns, "addr", "add", f"10.{self.net}.0.{i + 1}/24", "dev", inside)
                _ip("-n", ns, "link", "set", inside, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for i, ns in enumerate(self.names):
            _ip("link", "del", f"ph{i}o{self.tag}", check=False)
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.bridge, check=False)

    def interface(self, i: int) -> str:
        """Name of host i's network interface (inside its namespace)."""
        return f"ph{i}i{self.tag}"

    def run(self, script: str, ranks_per_host: int = 2, env=None, timeout=240, argv=None):
        """Run `script` (python -c text, or with argv=[path, args...] a file) on n * ranks_per_host
        ranks; returns [(rank, returncode, stdout, stderr)]."""
        secret = secrets.token_bytes(32)
        server = StoreServer(self.store_ip, 0, secret)
        size = self.n * ranks_per_host
        procs = []
        try:
            for i, ns in enumerate(self.names):
                for local in range(ranks_per_host):
                    rank = i * ranks_per_host + local
                    e = dict(os.environ, PYCCL_RANK=str(rank), PYCCL_SIZE=str(size),
                             PYCCL_LOCAL_RANK=str(local), PYCCL_LOCAL_SIZE=str(ranks_per_host),
                             PYCCL_STORE_ADDR=f"{self.store_ip}:{server.address[1]}",
                             PYCCL_JOB_SECRET=secret.hex(), PYCCL_HOST_ID=f"host{i}",
                             GLOO_SOCKET_IFNAME=self.interface(i), **(env or {}))
                    cmd = [sys.executable] + (argv if argv else ["-c", script])
                    procs.append((rank, subprocess.Popen(["ip", "netns", "exec", ns] + cmd,
                                                         env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                         text=True)))
            out = []
            for rank, p in procs:
                try:
                    so, se = p.communicate(timeout=timeout)
                except subprocess.TimeoutExpired:
                    p.kill()
                    so, se = p.communicate()
                    se += "\n[killed: timeout]"
                out.append((rank, p.returncode, so, se))
            return out
        finally:
            for _, p in procs:
                if p.poll() is None:
                    p.kill()
            server.close()
