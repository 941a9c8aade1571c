"""`python -m pyccl.doctor <dump dir or files>`: read flight-recorder dumps, say who is stuck.
`python -m pyccl.doctor kernels [--build] [--arch 90]`: where the CUDA kernels come from here.

Given the JSON dumps that ranks wrote on timeout (PYCCL_DUMP_ON_TIMEOUT), it reports:
  * ranks that called different collectives at the same sequence number (order mismatch),
    or the same op with different dtype/count/root;
  * ranks that are behind (their last collective has a lower sequence number) or whose
    dump is missing (dead, or stuck outside pyccl);
  * where each stuck rank waits (plan stage, chunk, peer) and which peer most ranks wait on.
"""
import collections
import glob
import json
import os
import re
import sys


def load(paths):
    files = []
    for p in paths:
        files += sorted(glob.glob(os.path.join(p, "pyccl-*-rank*.json"))) if os.path.isdir(p) else [p]
    return [json.load(open(f)) for f in files]


def diagnose(dumps) -> list:
    """Findings, most important first, as plain sentences."""
    out = []
    if not dumps:
        return ["no dumps found"]
    by_comm = collections.defaultdict(dict)
    for d in dumps:
        by_comm[d["comm"]][d["rank"]] = d
    for comm, ranks in by_comm.items():
        size = next(iter(ranks.values()))["size"]
        missing = sorted(set(range(size)) - set(ranks))
        if missing:
            out.append(f"{comm}: no dump from ranks {missing}: dead, or stuck outside pyccl "
                       f"(they never timed out inside a collective)")
        calls = {r: {e["seq"]: e for e in d["entries"]} for r, d in ranks.items()}
        seqs = sorted({s for c in calls.values() for s in c})
        for s in seqs:
            seen = {r: c[s] for r, c in calls.items() if s in c}
            kinds = {(e["op"], e.get("dtype"), e.get("count"), e.get("root")) for e in seen.values()}
            if len(kinds) > 1:
                detail = "; ".join(f"rank {r}: {e['op']} {e.get('dtype')} x{e.get('count')} root {e.get('root')}"
                                   for r, e in sorted(seen.items()))
                out.append(f"{comm}: collective #{s} differs between ranks (mismatched call order or "
                           f"arguments): {detail}")
                break
        last = {r: max(c) if c else 0 for r, c in calls.items()}
        front = max(last.values())
        for r, s in sorted(last.items()):
            if s < front:
                e = calls[r].get(s)
                out.append(f"{comm}: rank {r} is behind: its last collective is #{s} "
                           f"({e['op'] if e else '?'}, {e['state'] if e else '?'}) while others reached #{front}")
        waits = collections.Counter()
        for r, c in sorted(calls.items()):
            stuck = [e for e in c.values() if e["state"] in ("failed", "running")]
            for e in stuck[-1:]:
                out.append(f"{comm}: rank {r} stuck in #{e['seq']} {e['op']}: {e.get('error') or e['where']}")
                for peer in re.findall(r"(?:from|to) rank (\d+)", e.get("error", "") + e.get("where", "")):
                    waits[int(peer)] += 1
        if waits:
            peer, n = waits.most_common(1)[0]
            out.append(f"{comm}: most waits point at rank {peer} ({n} of {len(ranks)} dumps): look there first")
    return out


def kernels(args) -> int:
    """Where this machine's CUDA kernels come from: NVRTC, the GPU's architecture, the package's
    prebuilt cubins, the disk cache (units present); with --build, build every unit now (in
    the background builder's way) and say how each came (prebuilt / disk cache / compiled) and
    how long it took."""
    from .engines.cuda import build, kernel_cache as kc, nvrtc
    from .engines.cuda.kernels import cuda_source
    arch = None
    if "--arch" in args:
        arch = int(args[args.index("--arch") + 1])
    else:
        try:
            import cupy
            arch = int(cupy.cuda.Device().compute_capability)
        except Exception as e:  # noqa: BLE001 - no cupy or no GPU: say so
            print(f"GPU: none seen ({type(e).__name__}: {e}); pass --arch 90 to look at sm_90")
            return 1
    try:
        print(f"NVRTC: {nvrtc.lib()._name}, version {nvrtc.version()}, targets {nvrtc.supported_archs()}")
    except nvrtc.NvrtcError as e:
        print(f"NVRTC: {e}")
    source = cuda_source()
    pre = kc.prebuilt_target(arch, source=source)
    print(f"GPU: sm_{arch}; prebuilt in the package: {pre[0] + ' (' + pre[1] + ')' if pre else 'none that fits'}")
    b = build.builder_for(arch)
    units = kc.all_units()
    if b.cache is not None:
        have = set(b.cache.units())
        print(f"disk cache: {b.cache.dir}: {len(have & set(units))} of {len(units)} units"
              f"{', ' + str(len([u for u in have if u.startswith('one:')])) + ' single kernels' if have else ''}")
    else:
        print("disk cache: off (PYCCL_KERNEL_CACHE=0, or no NVRTC to key it)")
    if "--build" in args:
        import time
        t = time.perf_counter()
        b.threads = max(b.threads, 1)
        b.start()
        b.wait()
        for u in units:
            if b._images.get(u) is None:
                b._ready(u)
        rows = b.report()
        for unit, how, sec in sorted(rows):
            print(f"  {unit:24s} {how:22s} {sec:7.2f} s")
        print(f"every unit ready in {time.perf_counter() - t:.1f} s "
              f"({sum(1 for r in rows if r[1].startswith('compiled'))} compiled)")
    return 0


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__)
        return 2
    if args[0] == "kernels":
        return kernels(args[1:])
    for line in diagnose(load(args)):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
