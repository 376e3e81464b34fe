"""Relabel the distilled sets of the IPC grid with the other method's teacher.

scdd recovers from (and by default relabels with) the SSL backbone + linear
probe; sre2l uses the supervised backbone for both. This script post-trains
the images of one method with the other method's teacher, with the same
post-train budget (`scdd-ray posttrain` takes the preset's settings), so image
quality and teacher quality can be told apart. It reuses the work directory of

    python benchmarks/digits_grid.py --grid ipc --seeds 0,1,2 --work runs/ipc --md ...

and runs, per (IPC, seed), `scdd-ray posttrain --distilled runs/ipc/<method>_IPC_<k>-s<seed>
--teacher T --seed <seed>`, where T is the recovery backbone of that seed's scdd (simclr) or sre2l
(supervised) cell, as its report.json names it. Finished cells are read, not rerun. Since every method
of a digits_grid run is relabelled by the supervised teacher, the "own" column is the images' own
run (for scdd: the supervised teacher, not its SSL backbone).

    python benchmarks/teacher_swap.py --images scdd --teacher supervised --ipcs 1,10,50 --work runs/ipc --md OUT.md
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys

from _tables import write_table

OWN_TEACHER = {"scdd": "simclr", "sre2l": "supervised"}
RECOVERED_BY = {v: k for k, v in OWN_TEACHER.items()}  # teacher kind -> the method whose backbone it is


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", choices=sorted(OWN_TEACHER), required=True, help="whose distilled images")
    ap.add_argument("--teacher", choices=sorted(set(OWN_TEACHER.values())), required=True, help="whose teacher")
    ap.add_argument("--ipcs", default="1,10,50")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--work", required=True, help="the digits_grid.py --grid ipc work directory")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--md", required=True)
    a = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    ipcs, seeds = [int(v) for v in a.ipcs.split(",")], [int(v) for v in a.seeds.split(",")]
    rows = []
    for ipc in ipcs:
        own, swapped = [], []
        for seed in seeds:
            src = os.path.join(a.work, f"{a.images}_IPC_{ipc}-s{seed}")
            with open(os.path.join(a.work, f"{RECOVERED_BY[a.teacher]}_IPC_{ipc}-s{seed}", "report.json")) as f:
                teacher = json.load(f)["backbone"]
            out = f"{src}-teacher-{a.teacher}"
            result = os.path.join(out, "posttrain.json")
            if not os.path.isfile(result):
                cmd = [sys.executable, "-m", "scdd_ray", "posttrain", "--distilled", src, "--teacher", teacher,
                       "--seed", str(seed), "--out", out]
                print("+", shlex.join(cmd), flush=True)
                subprocess.run(cmd, check=True, env=env)
            with open(result) as f:
                swapped.append(json.load(f)["top1"])
            with open(os.path.join(src, "report.json")) as f:
                own.append(json.load(f)["top1"])
        rows.append({"ipc": ipc, "own_teacher": own, "swapped_teacher": swapped})

    def ms(v: list[float]) -> str:
        return f"{statistics.fmean(v):.1f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.1f}"

    lines = [f"| IPC | {a.images} images, {OWN_TEACHER[a.images]} teacher (own) | {a.images} images, {a.teacher} teacher |"
             " per seed (swapped) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ipc']} | {ms(r['own_teacher'])} | {ms(r['swapped_teacher'])} | "
                     f"{', '.join(f'{t:.1f}' for t in r['swapped_teacher'])} |")
    table = "\n".join(lines) + "\n"
    write_table(a.md, f"Seeds {seeds}; command: python benchmarks/teacher_swap.py --images {a.images} "
                      f"--teacher {a.teacher} --ipcs {a.ipcs} --seeds {a.seeds} --work {a.work} --md {a.md}", table,
                {"images": a.images, "teacher": a.teacher, "seeds": seeds, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
