"""What the benchmark scripts share: writing a markdown table (with the command that made it) and its JSON."""
from __future__ import annotations

import os

from scdd_ray.store.atomic import atomic_write_json


def write_table(md: str, heading: str, table: str, data) -> None:
    """`heading` + table to `md`, `data` to the .json beside it; both atomically, then print the table."""
    with open(md + ".tmp", "w") as f:
        f.write(heading + "\n\n" + table)
    os.replace(md + ".tmp", md)
    atomic_write_json(os.path.splitext(md)[0] + ".json", data)
    print(table)
