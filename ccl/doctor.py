"""`python -m pyccl.doctor <dump dir or files>`: read flight-recorder dumps, say who is stuck.

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


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__)
        return 2
    for line in diagnose(load(args)):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
