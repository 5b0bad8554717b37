"""Benchmark to-modelarray of CIFTI maps read from a local S3 endpoint (moto's standalone server):
GreyArray against ModelArrayIO 26.0.0, both with --s3-workers 8, in the same run, on the same
objects; GreyArray on the same files from local disk for reference.

    python3 benchmarks/s3_benchmark.py                 # 500 maps of 91k greyordinates
    python3 benchmarks/s3_benchmark.py --sizes 100 500 --workers 8

Wall time and peak RSS by GNU time; checks that both HDF5 files hold the same values. moto runs
from its own virtual environment (GREYARRAY_MOTO_VENV, default /tmp/greyarray-moto-venv) and
ModelArrayIO from --maio-venv (with boto3, which its s3:// reading needs); both are made when
missing. Writes benchmarks/results/s3.json and s3.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from greyarray import __version__
from greyarray.demo import template_path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchmark import build_cohort, ensure_maio, run  # noqa: E402 (this folder's module)

MOTO = "moto[server]==5.2.5"
KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}


def start_moto(venv: Path) -> tuple[subprocess.Popen, str]:
    exe = venv / "bin" / "moto_server"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", MOTO], check=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("moto_server did not start")


def upload(folder: Path, csv: Path, endpoint: str, bucket: str) -> Path:
    """Every file of the cohort as s3://BUCKET/<file>; the cohort CSV naming the objects."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    table = pd.read_csv(csv)
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda name: s3.upload_file(str(folder / name), bucket, name),
                table["source_file"],
            )
        )
    remote = folder.parent / "s3_cohort.csv"
    table.assign(source_file=[f"s3://{bucket}/{name}" for name in table["source_file"]]).to_csv(
        remote, index=False
    )
    return remote


def measure(n: int, work: Path, endpoint: str, maio: Path | None, workers: int) -> dict:
    folder = work / f"n{n}"
    csv = build_cohort(folder / "cohort", n, template_path())
    remote = upload(folder / "cohort", csv, endpoint, f"bench-{n}")
    out = folder / "out"
    out.mkdir(exist_ok=True)
    for old in out.glob("*.h5"):
        old.unlink()
    greyarray = [sys.executable, "-m", "greyarray", "to-modelarray", "--log-level", "WARNING"]
    row = {"n": n, "workers": workers}
    s3_workers = ["--s3-workers", str(workers)]
    row["greyarray_s3"] = run(
        [*greyarray, "--cohort-file", str(remote), "--output", str(out / "g_s3.h5"), *s3_workers]
    )
    row["greyarray_local"] = run(
        [*greyarray, "--cohort-file", str(csv), "--output", str(out / "g_local.h5")]
    )
    if maio is not None:
        theirs = [str(maio), "to-modelarray", "--log-level", "WARNING", *s3_workers]
        row["modelarrayio_s3"] = run(
            [*theirs, "--cohort-file", str(remote), "--output", str(out / "m_s3.h5")], cwd=out
        )
        row["speedup"] = round(
            row["modelarrayio_s3"]["seconds"] / row["greyarray_s3"]["seconds"], 1
        )
        with h5py.File(out / "g_s3.h5") as a, h5py.File(out / "m_s3.h5") as b:
            row["same_values"] = bool(
                np.array_equal(a["scalars/thickness/values"][()], b["scalars/thickness/values"][()])
            )
    return row


def markdown(rows: list[dict], machine: str) -> str:
    lines = [
        f"Machine: {machine}\n",
        "| N | GreyArray from S3 (s / MB) | ModelArrayIO from S3 (s / MB) | speed-up | "
        "GreyArray local files (s / MB) | same values |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        g, loc, m = row["greyarray_s3"], row["greyarray_local"], row.get("modelarrayio_s3")
        theirs = f"{m['seconds']} / {m['peak_rss_mb']:.0f}" if m else "-"
        lines.append(
            f"| {row['n']} | {g['seconds']} / {g['peak_rss_mb']:.0f} | {theirs} | "
            f"{row.get('speedup', '-')}x | {loc['seconds']} / {loc['peak_rss_mb']:.0f} | "
            f"{row.get('same_values', '-')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("/tmp/greyarray-bench/s3"))
    parser.add_argument("--maio-venv", type=Path, default=Path("/tmp/greyarray-bench/maio-venv"))
    parser.add_argument(
        "--moto-venv",
        type=Path,
        default=Path(os.environ.get("GREYARRAY_MOTO_VENV", "/tmp/greyarray-moto-venv")),
    )
    parser.add_argument("--skip-modelarrayio", action="store_true")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "s3.json")
    args = parser.parse_args()
    maio = None
    if not args.skip_modelarrayio:
        maio = ensure_maio(args.maio_venv)
        subprocess.run([str(args.maio_venv / "bin" / "pip"), "install", "-q", "boto3"], check=True)
    server, endpoint = start_moto(args.moto_venv)
    os.environ.update(KEYS, AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1")
    try:
        rows = []
        for n in args.sizes:
            rows.append(measure(n, args.work, endpoint, maio, args.workers))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.kill()
        server.wait()
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"greyarray {__version__}, moto 5.2.5 on 127.0.0.1"
    )
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine, "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    args.output.with_suffix(".md").write_text(markdown(rows, machine))
    print(markdown(rows, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
