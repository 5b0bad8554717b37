"""What the crash-safe update of the user's HDF5 costs (io/h5update.py), on 91,282 x N.

Every write into a user's HDF5 (fit-lm's, fit-gam's results; harmonize's scalar) copies the
file beside itself, writes the copy, fsyncs it and renames it over the original. Measured here,
on the same file and page cache, in one run:

  - fit-lm 'thickness ~ age + sex' end to end (GNU time: wall, peak RSS), which now includes it;
  - write_results of fit-lm's 12 columns through updating_hdf5, with its parts: lock, copy
    (reflink if the file system shares blocks, else copy_file_range), HDF5's writes, fsync of
    the copy, rename and fsync of the folder (median of --repeats);
  - the same results written in place as before (h5py, mode "a"), without and with an fsync
    (the old write had none, and was not crash-safe either way);
  - the extra disk space an update needs while it runs.

    python3 benchmarks/update_benchmark.py                     # 1000 subjects
    python3 benchmarks/update_benchmark.py --subjects 100      # a quick look

The cohort (benchmark.py's synthetic 91k maps) and its HDF5 are built once under --work.
Results: benchmarks/results/update.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
from benchmark import run
from permutation_benchmark import build

from greyarray.io import h5update
from greyarray.stats import results

HERE = Path(__file__).resolve().parent
GREYARRAY = [sys.executable, "-m", "greyarray"]
COLUMNS = 12  # fit-lm's default columns for 'thickness ~ age + sex' (element_id included)
STEPS = {"_locked": "lock", "_copy": "copy", "_sync": "fsync copy"}


@contextmanager
def timed_parts(parts: dict):
    """Time updating_hdf5's steps by wrapping them (same calls, same order)."""
    wrapped = {}
    for name in ("_locked", "_copy", "_sync"):
        original = getattr(h5update, name)
        wrapped[name] = original

        def timer(*args, _name=name, _original=original, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                key = "fsync folder" if kwargs.get("folder") else STEPS[_name]
                parts[key] = parts.get(key, 0.0) + time.perf_counter() - start

        if name == "_locked":  # a context manager: time its entry only
            timer = _timed_entry(original, parts)
        setattr(h5update, name, timer)
    replace = os.replace

    def timed_replace(*args):
        start = time.perf_counter()
        replace(*args)
        parts["rename"] = parts.get("rename", 0.0) + time.perf_counter() - start

    os.replace = timed_replace
    try:
        yield
    finally:
        os.replace = replace
        for name, original in wrapped.items():
            setattr(h5update, name, original)


def _timed_entry(original, parts):
    @contextmanager
    def entry(*args, **kwargs):
        start = time.perf_counter()
        with original(*args, **kwargs) as held:
            parts["lock"] = time.perf_counter() - start
            yield held

    return entry


def one_update(h5: Path, table: np.ndarray, columns: list[str]) -> dict:
    parts: dict = {}
    start = time.perf_counter()
    with timed_parts(parts):
        results.write_results(h5, "bench", columns, table, {}, overwrite=True)
    total = time.perf_counter() - start
    parts["hdf5 writes"] = total - sum(parts.values())
    return {"total": total, **parts}


def in_place(h5: Path, table: np.ndarray, columns: list[str], fsync: bool) -> float:
    """The old write: straight into the file (h5py mode a)."""
    start = time.perf_counter()
    with h5py.File(h5, "a") as file:
        group = file.require_group("results")
        if "bench" in group:
            del group["bench"]
        made = group.create_group("bench")
        made.create_dataset(
            "results_matrix", data=table, chunks=(len(columns), 4096), maxshape=(None, None),
            compression="gzip", compression_opts=4, shuffle=True,
        )  # fmt: skip
        made.create_dataset("column_names", data=columns, dtype=h5py.string_dtype())
    if fsync:
        fd = os.open(h5, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ga-bench")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "update.json")
    args = parser.parse_args()
    h5, csv = build(args.work, args.subjects, "update.h5")
    size = h5.stat().st_size
    h5.read_bytes()  # page cache warm, as for every row
    fit = [*GREYARRAY, "fit-lm", "--input-hdf5", str(h5), "--cohort-file", str(csv)]
    fit += ["--formula", "thickness ~ age + sex", "--overwrite", "--log-level", "WARNING"]
    fit_lm = run(fit)
    rng = np.random.default_rng(0)
    columns = [f"c{i}" for i in range(COLUMNS)]
    table = rng.normal(size=(COLUMNS, 91282))
    updates = [one_update(h5, table, columns) for _ in range(args.repeats)]
    copy = h5.with_name("in_place.h5")
    shutil.copyfile(h5, copy)
    plain = [in_place(copy, table, columns, fsync=False) for _ in range(args.repeats)]
    synced = [in_place(copy, table, columns, fsync=True) for _ in range(args.repeats)]
    copy.unlink()
    parts = {k: round(statistics.median(u[k] for u in updates), 3) for k in updates[0]}
    reflinked = _reflinks(h5)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "date": time.strftime("%Y-%m-%d"),
        "subjects": args.subjects,
        "elements": 91282,
        "file_mb": round(size / 2**20, 1),
        "file_system_reflinks": reflinked,
        "fit_lm": fit_lm,
        "update_s": parts,
        "in_place_s": round(statistics.median(plain), 3),
        "in_place_fsync_s": round(statistics.median(synced), 3),
        "extra_space_mb": round((0 if reflinked else size) / 2**20 + table.nbytes / 2**20, 1),
    }
    args.output.write_text(json.dumps(result, indent=1))
    table_md = markdown(result)
    args.output.with_suffix(".md").write_text(table_md)
    print(table_md)
    return 0


def _reflinks(h5: Path) -> bool:
    probe = h5.with_name(".reflink-probe")
    try:
        with open(h5, "rb") as source, open(probe, "wb") as target:
            return h5update._reflink(source.fileno(), target.fileno())
    finally:
        probe.unlink(missing_ok=True)


def markdown(r: dict) -> str:
    u = r["update_s"]
    return (
        f"91,282 x {r['subjects']} ({r['file_mb']} MB HDF5; {r['machine']}; reflinks: "
        f"{'yes' if r['file_system_reflinks'] else 'no'})\n\n"
        "| step | seconds |\n|---|---|\n"
        + "".join(f"| {k} | {v} |\n" for k, v in u.items())
        + f"| written in place (before; not crash-safe) | {r['in_place_s']} |\n"
        f"| written in place + fsync | {r['in_place_fsync_s']} |\n"
        f"\nfit-lm end to end: {r['fit_lm']['seconds']} s, {r['fit_lm']['peak_rss_mb']} MB peak; "
        f"extra disk space during an update: {r['extra_space_mb']} MB\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
