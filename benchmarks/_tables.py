"""What the benchmark scripts share: writing a markdown table (with the command that made it) and its JSON."""
from __future__ import annotations

import os
import shlex
import sys

from scdd_ray.provenance import commit, machine
from scdd_ray.store.atomic import atomic_write_json


def stamp(data) -> dict:
    """`data` (a list goes under `rows`) after this script's command line, commit and machine; a `command`
    the script composed itself is kept."""
    data = data if isinstance(data, dict) else {"rows": data}
    return {"command": shlex.join(["python", *sys.argv]), "commit": commit(), "machine": machine(), **data}


def write_table(md: str, heading: str, table: str, data) -> None:
    """`heading` + table to `md`, `data` (stamped) to the .json beside it; both atomically, then print the
    table."""
    with open(md + ".tmp", "w") as f:
        f.write(heading + "\n\n" + table)
    os.replace(md + ".tmp", md)
    atomic_write_json(os.path.splitext(md)[0] + ".json", stamp(data))
    print(table)
