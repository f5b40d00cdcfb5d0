"""What the JPEG section prints: per set, its folder and its table; how the rows are set up;
the two-server line; the goals and the legend."""

from __future__ import annotations

from typing import Any

from .common import Column, Row, goal_lines, row_table, setup_lines
from .jpeg import ROW_BATCHFEED, ROW_TWO_SERVERS, plural
from .jpeg_data import QUALITY
from .workloads import BenchOptions

LEGEND = """\
  images/s: images delivered into this process (decoded, cropped, flipped, normalised float32
    CHW, with their labels), in the best of the rounds (rounds: each round's images/s; the
    rows take turns, round after round).  vs torch: over torch's DataLoader with as many worker
    processes; vs bf tcp: over batchfeed tcp with 2 workers; vs 1 worker: the 2-worker rows
    over the same loader's 1-worker row (batchfeed's: the fast path's).  first batch ms:
    batchfeed: Client() to the first batch, the server already up (server start s: its start,
    the folder read into shared memory); torch and SPDL: iter() to the first batch.
  CPU, in cores (CPU seconds per second of the window): client: this process (all threads;
    SPDL decodes in it); loader: the servers (front ends and workers) or the DataLoader's
    workers; other: the rest of the machine's busy time (/proc/stat, steal included): other
    jobs on this host.  loader CPU ms/image: the loader's CPU per image delivered.
  This machine has {cores} cores, shared by the consuming process, the servers' front ends,
    every worker and whatever else runs on it: a row's workers get at most {cores} - client -
    other cores, so 2 workers reach 2x 1 worker only while nothing else takes CPU."""

COLUMNS = [Column("images/s", "rate", ",.0f"),
           Column("rounds", cell=lambda r: " / ".join(f"{v:,.0f}" for v in r.values["runs"])),
           Column("vs torch", "vs_torch", ".2f"), Column("vs 1 worker", "vs_one_worker", ".2f"),
           Column("vs bf tcp", "vs_tcp", ".2f"), Column("first batch ms", "first_batch_ms", ",.0f"),
           Column("client CPU", "client_cpu_cores", ".2f"),
           Column("loader CPU", "loader_cpu_cores", ".2f"),
           Column("other CPU", "other_cpu_cores", ".2f"),
           Column("loader CPU ms/image", "loader_cpu_ms_per_image", ".3f"),
           Column("server start s", "server_start_s", ".1f")]


def format_jpeg(result: dict[str, Any], options: BenchOptions) -> list[str]:
    if not result["sets"]:
        return ["jpeg: " + "; ".join(sorted({r["status"] for r in result["rows"]}))]
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    lines = [f"jpeg: decode + random-resized-crop + flip + normalise to float32 CHW, from "
             f"folders of JPEGs (quality {QUALITY}, 10 classes); {result['seconds']:g} s per "
             f"row after {result['warmup_s']:g} s warm-up, best of {result['rounds']} "
             f"round{'' if result['rounds'] == 1 else 's'}; installed: {versions}"]
    rows = [Row.from_dict(r) for r in result["rows"]]
    for name, described in result["sets"].items():
        lines += ["", f"  {described['description']} ({described['mean_bytes'] / 1e3:.1f} kB "
                      f"and {described['bits_per_pixel']:.1f} bits/pixel on average; written "
                      f"in {described['write_s']:.0f} s)"]
        mine = [r for r in rows if r.values.get("set") == name]
        lines += row_table(COLUMNS, mine)
        lines += two_server_lines(mine, result["cores"])
    lines += ["", "  how the rows are set up:",
              "  batchfeed: --transform \"batchfeed.transforms:train_images(size=S)\" in the "
              "servers' workers (decoder and resizer as batchfeed.transforms.images picks them "
              "from what is installed), --slot-mb as one batch needs; the client on the fast "
              "path (ipc://, what a trainer on the server's host uses) but in the tcp row."]
    seen: set[str] = set()
    for r in rows:  # the same setup for both sets: once
        if r.setup and r.name not in seen:
            seen.add(r.name)
            lines += setup_lines([r])
    lines += goal_lines(result["goals"])
    lines += [f"  problem: {p}" for p in result["problems"]]
    return lines + [LEGEND.format(cores=result["cores"])]


def two_server_lines(rows: list[Row], cores: int) -> list[str]:
    table = {r.name: r for r in rows if r.ok and r.rate}
    two, one = table.get(ROW_TWO_SERVERS), table.get(plural(ROW_BATCHFEED, 1))
    if two is None or one is None or not one.rate or not two.rate:
        return []
    both = table.get(plural(ROW_BATCHFEED, 2))
    beside = (f" (one server with 2 workers: {(both.rate or 0) / one.rate:.2f}x)"
              if both else "")
    return [f"  two servers of 1 worker sharing one job: "
            f"{two.rate / one.rate:.2f}x one server of 1 worker{beside}. "
            f"Here both servers run on the same {cores} cores as the client, so this can show at "
            f"most ~{min(cores, 2)}x (less the front ends' and the client's share); on separate "
            "hosts each server brings its own cores, and one job's decode scales with the "
            "number of loader hosts until the trainer's network (a float32 224x224 image is "
            "602 kB: ~2,000 images/s fill 10 Gb/s) or its client CPU is the limit."]
