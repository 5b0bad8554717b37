"""Time the HTML reports at scale: the group report for 1,000 subjects x 91,282 greyordinates and
the participant report per map.

The group HDF5 is written in GreyArray's layout (chunks of all subjects, gzip + shuffle, the
geometry under greyarray/geometry copied from a file made by to-modelarray) with demo-like
thickness maps, a few missing values and three scrambled subjects; a linear model is fitted so
the report also draws an analysis. Each report is timed in a fresh Python process (imports, mesh
projections and all), with peak RSS from GNU time.

    python3 benchmarks/report_benchmark.py                    # 1,000 subjects
    python3 benchmarks/report_benchmark.py --subjects 200 --folder /tmp/reportbench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from greyarray import demo
from greyarray.io.cohort import load_cohort
from greyarray.io.formats import cifti
from greyarray.io.store import LIBVER, StoreOptions, chunk_shape, to_modelarray

HERE = Path(__file__).resolve().parent
SCRAMBLED = (17, 404, 777)  # rows of planted outliers


def build_group(folder: Path, n: int) -> tuple[Path, Path]:
    """(HDF5, cohort CSV) of ``n`` subjects on the 91k template."""
    seed_dir = folder / "seed"
    csv = demo.write_cohort(seed_dir, 2)
    small = folder / "seed.h5"
    to_modelarray(load_cohort(csv), small, StoreOptions(), overwrite=True)
    table = demo.phenotypes(n)
    names = [f"{s}_thickness.dscalar.nii" for s in table["participant_id"]]
    path = folder / "group.h5"
    g = cifti.read_file(demo.template_path()).geometry.n_elements
    options = StoreOptions()
    rng = np.random.default_rng(0)
    index = np.arange(g)
    pattern = 0.4 * np.sin(index / 900.0) + 0.2 * np.cos(index / 131.0)
    ageing = -0.004 * (1 + np.sin(index / 5000.0))
    age = table["age"].to_numpy()[:, None]
    with h5py.File(small, "r") as seed, h5py.File(path, "w", libver=LIBVER) as h5:
        for name in ("greyordinates", "greyarray"):
            seed.copy(name, h5)
        values = h5.create_dataset(
            "scalars/thickness/values",
            shape=(n, g),
            dtype="f4",
            chunks=chunk_shape(n, g, 4, options),
            **options.filters,
        )
        h5.create_dataset("scalars/thickness/column_names", data=names, dtype=h5py.string_dtype())
        step = values.chunks[1] * 32
        for start in range(0, g, step):
            part = slice(start, min(start + step, g))
            block = 2.5 + pattern[part] + ageing[part] * (age - 40)
            block = block + rng.normal(0, 0.15, block.shape)
            block[rng.random(block.shape) < 1e-4] = np.nan
            for i in (i for i in SCRAMBLED if i < n):  # spatially scrambled (per stripe)
                block[i] = rng.permutation(block[i])
            values[:, part] = block.astype(np.float32)
    cohort = folder / "cohort.csv"
    table.assign(scalar_name="thickness", source_file=names).to_csv(cohort, index=False)
    shutil.rmtree(seed_dir)
    small.unlink()
    return path, cohort


def timed(code: str) -> dict:
    """Wall time (s) and peak RSS (MiB) of ``python3 -c code`` with this checkout first."""
    env_path = str(HERE.parent / "src")
    done = subprocess.run(
        ["/usr/bin/time", "-f", "@@ %e %M", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": env_path},
    )
    if done.returncode:
        raise RuntimeError(done.stderr)
    wall, rss = done.stderr.strip().splitlines()[-1].split()[1:]
    return {"seconds": float(wall), "peak_mib": round(int(rss) / 1024), "stdout": done.stdout}


GROUP = """
import time
start = time.time()
from pathlib import Path
from greyarray.report import GroupInput, group_report
done = group_report(Path({out!r}), [GroupInput(Path({h5!r}), Path({csv!r}))])
print(round(time.time() - start, 2), len(done.outliers), [o.subject for o in done.outliers])
"""

PARTICIPANT = """
import time
start = time.time()
from pathlib import Path
from greyarray.report import MapFile, participant_report
maps = [MapFile(f"map{{i}}", Path({path!r}), session=str(i)) for i in range({count})]
participant_report(Path({out!r}), "01", maps)
print(round(time.time() - start, 2))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument("--folder", type=Path, help="keep the data here (default: temporary)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "report.json")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="greyarray-report-"))
    folder.mkdir(parents=True, exist_ok=True)
    h5, csv = folder / "group.h5", folder / "cohort.csv"
    if not h5.exists():
        start = time.time()
        h5, csv = build_group(folder, args.subjects)
        print(f"built {h5} ({args.subjects} x 91,282) in {time.time() - start:.1f} s")
        from greyarray.stats.lm import fit_lm

        start = time.time()
        fit_lm(h5, csv, "thickness ~ age + sex", "lm", overwrite=True)
        print(f"fit-lm thickness ~ age + sex: {time.time() - start:.1f} s")
    group = timed(GROUP.format(out=str(folder / "group.html"), h5=str(h5), csv=str(csv)))
    size = (folder / "group.html").stat().st_size
    print(
        f"group report: {group['seconds']:.1f} s, peak {group['peak_mib']} MiB, "
        f"{size / 2**20:.1f} MiB HTML; flagged: {group['stdout'].strip()}"
    )
    one_map = demo.template_path()
    data = folder / "map.dscalar.nii"
    writer = cifti.CiftiWriter(cifti.read_file(one_map).geometry)
    writer.write(data, next(demo.thickness_maps(91282, demo.phenotypes(1))), "thickness")
    single = timed(PARTICIPANT.format(path=str(data), count=1, out=str(folder / "p1.html")))
    four = timed(PARTICIPANT.format(path=str(data), count=4, out=str(folder / "p4.html")))
    per_map = (four["seconds"] - single["seconds"]) / 3
    print(
        f"participant report, 1 map: {single['seconds']:.1f} s (process, imports and mesh "
        f"projections included); 4 maps: {four['seconds']:.1f} s, {per_map:.2f} s per extra map"
    )
    results = {
        "subjects": args.subjects,
        "elements": 91282,
        "group_report_seconds": group["seconds"],
        "group_report_peak_mib": group["peak_mib"],
        "group_report_html_mib": round(size / 2**20, 1),
        "participant_report_1_map_seconds": single["seconds"],
        "participant_report_4_maps_seconds": four["seconds"],
        "participant_report_seconds_per_extra_map": round(per_map, 2),
        "flagged": group["stdout"].strip(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.output}")
    if not args.folder:
        shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
