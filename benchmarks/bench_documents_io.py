"""Reading and writing many abstracts in each document format: seconds and peak memory, each arm alone in a fresh
process. The abstracts are BioNLP2004's 2,404 (benchmarks/bionlp_documents.py: text and mentions) cycled with new
ids up to ``--docs``; they are made one at a time as the writer asks, so a writer's memory is its own. Run at two
sizes, the peaks show which readers and writers stream (memory flat) and which hold the whole file.

    python benchmarks/bench_documents_io.py --docs 36000 3600 --out /tmp/docio

Prints a JSON line per arm: format, documents, operation, seconds, the process's RSS after its imports (for the
writers: with the 2,404 source abstracts in memory) and its peak RSS during the arm (MiB), file size; and the CPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

FORMATS = {
    "bioc-xml": "x.bioc.xml",
    "bioc-json": "x.bioc.json",
    "pubtator": "x.pubtator",
    "brat": "brat",
    "labelstudio": "x.labelstudio.json",
    "jsonl": "x.jsonl",
    "spacy": "x.spacy",
    "pubtator-gz": "x.pubtator.gz",
}


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS) or at its peak since ``reset_peak`` (VmHWM), MiB. Not ru_maxrss:
    a child inherits its parent's peak across fork and exec."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak (VmHWM) starts again from now


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size


def arm(fmt: str, op: str, n: int, out: Path, data: Path) -> dict:
    from bionlp_documents import documents

    from loratag.documents import open_writer, read_documents

    path = out / f"{n}-{FORMATS[fmt]}"
    kind = fmt.removesuffix("-gz")
    if op == "write":
        base = [d for split in ("train", "validation", "test") for d in documents(data, split)]
        baseline = rss_mib()
        reset_peak()
        start = time.monotonic()
        stream = (replace(d, id=f"s{i}") for i, d in zip(range(n), itertools.cycle(base)))
        mentions = 0
        with open_writer(path, kind) as w:
            for d in stream:
                w.write(d)
                mentions += len(d.spans)
    else:
        import bioc  # noqa: F401  (imports in the baseline, as for the writers)

        baseline = rss_mib()
        reset_peak()
        start = time.monotonic()
        count = mentions = 0
        for d in read_documents(path):
            count += 1
            mentions += len(d.spans)
        assert count == n, (fmt, count, n)
    seconds = time.monotonic() - start
    peak = rss_mib("VmHWM")
    return {"format": fmt, "op": op, "documents": n, "mentions": mentions, "seconds": round(seconds, 2),
            "docs_per_s": round(n / seconds), "peak_rss_mib": round(peak), "baseline_rss_mib": round(baseline),
            "bytes": size(path)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, nargs="+", default=[36000])
    ap.add_argument("--formats", nargs="+", default=list(FORMATS))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/bionlp2004"))
    ap.add_argument("--arm", nargs=3, metavar=("FORMAT", "OP", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        fmt, op, n = args.arm
        print(json.dumps(arm(fmt, op, int(n), args.out, args.data)))
        return
    from _common import cpu_facts

    args.out.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"cpu": cpu_facts()}), flush=True)
    for n in args.docs:
        for fmt in args.formats:
            for op in ("write", "read"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--out",
                    str(args.out),
                    "--data",
                    str(args.data),
                    "--arm",
                    fmt,
                    op,
                    str(n),
                ]
                print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip(), flush=True)
            target = args.out / f"{n}-{FORMATS[fmt]}"
            shutil.rmtree(target) if target.is_dir() else target.unlink()


if __name__ == "__main__":
    main()
