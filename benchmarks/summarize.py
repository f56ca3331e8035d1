"""Markdown tables from pytest-benchmark JSON files: one table per file, a row per case, every
`extra_info` column, and each case's speed-up over its group's peer — the time of the group's
`eager` (kernels) or `diffusers` (sampler) row divided by the case's own time. Times are the GPU
`ms` from CUDA events where the case recorded one, else pytest-benchmark's host median.

    python benchmarks/summarize.py RESULTS_DIR > RESULTS_DIR/summary.md

RESULTS_DIR/environment.md, if present, heads the output.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

PEERS = ("eager", "diffusers")  # the baseline of a group, first found
HIDDEN = {"device", "torch", "impl"}  # device and torch are in environment.md; impl is a column


def case_ms(bench: dict) -> float:
    ms = bench.get("extra_info", {}).get("ms")
    return ms if isinstance(ms, (int, float)) else bench["stats"]["median"] * 1e3


def speedups(benches: list[dict]) -> dict[str, float]:
    """name → peer time / own time, for the cases whose group has a peer row."""
    impl_ms: dict[tuple, float] = {(b.get("group"), b.get("extra_info", {}).get("impl")): case_ms(b)
                                   for b in benches}
    ratios = {}
    for b in benches:
        peer = next((impl_ms[b.get("group"), p] for p in PEERS if (b.get("group"), p) in impl_ms), None)
        if peer is not None:
            ratios[b["name"]] = peer / case_ms(b)
    return ratios


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table(benches: list[dict]) -> str:
    if not benches:
        return "(no results)"
    keys = sorted({k for b in benches for k in b.get("extra_info", {})} - HIDDEN)
    ratio = speedups(benches)
    lines = ["| case | impl | ms | × vs peer | " + " | ".join(keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]
    for b in benches:
        info = b.get("extra_info", {})
        cells = [b["name"], info.get("impl", ""), _cell(case_ms(b)),
                 _cell(ratio[b["name"]]) if b["name"] in ratio else "",
                 *(_cell(info.get(k, "")) for k in keys)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(folder: str) -> None:
    dest = Path(folder)
    if (dest / "environment.md").exists():
        print((dest / "environment.md").read_text())
    for path in sorted(dest.glob("*.json")):
        print(f"\n## {path.stem}\n")
        print(table(json.loads(path.read_text()).get("benchmarks", [])))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/summarize.py RESULTS_DIR")
    main(sys.argv[1])
