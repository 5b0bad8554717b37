"""Cohorts on S3, against a real S3 API on localhost: moto's standalone server (moto[server], in
its own virtual environment: its pins are not ours). An S3 cohort converts to the HDF5 a local
one gives (values, sha256 of the same bytes); public buckets are read unsigned; credentials come
from boto3's chain; a missing key, denied access, a stopped server and transient 5xx answers end
as they should (66, 77, 69, retried), with one error line and nothing written. NIfTI maps with
subject masks and fixel data on S3 convert to the HDF5 of the same files read locally.

The venv is GREYARRAY_MOTO_VENV (default /tmp/greyarray-moto-venv), made here when missing
(.ci/run makes it before the tests); without it the tests skip, except under CI=1.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import PSCALAR, run_greyarray, subject_values, write_cohort

MOTO = "moto[server]==5.2.5"
GREYARRAY = [sys.executable, "-m", "greyarray", "to-modelarray"]
VENV = Path(os.environ.get("GREYARRAY_MOTO_VENV", "/tmp/greyarray-moto-venv"))
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
PUBLIC_READ = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": "*",
            "Action": "s3:GetObject",
            "Resource": "arn:aws:s3:::public/*",
        }
    ],
}


def moto_server() -> Path:
    """moto_server from its own venv, installed when missing; skip (laptop) or fail (CI)."""
    exe = VENV / "bin" / "moto_server"
    if not exe.exists():
        made = subprocess.run(
            f"{sys.executable} -m venv {VENV} && {VENV}/bin/pip install -q '{MOTO}'",
            shell=True,
            capture_output=True,
            text=True,
        )
        if made.returncode or not exe.exists():
            message = f"cannot install {MOTO} in {VENV}: {made.stderr[-500:]}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    return exe


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A moto server on 127.0.0.1; ``auth_after`` requests, IAM authenticates every request."""

    def __init__(self, auth_after: int | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "INITIAL_NO_AUTH_ACTION_COUNT"}
        if auth_after is not None:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(auth_after)
        self.process = subprocess.Popen(
            [moto_server(), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )

    def wait(self) -> Server:
        """Until it accepts connections (a TCP connect: an HTTP request would count as an
        action towards ``auth_after``)."""
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                assert self.process.poll() is None and time.monotonic() < deadline, "no moto"
                time.sleep(0.05)

    def client(self, **keys):
        import boto3

        keys = keys or {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", **keys)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture(scope="module")
def data(tmp_path_factory, writer91k):
    """Six subjects' 91k maps (one with NaNs) as local files, with a local cohort CSV."""
    root = tmp_path_factory.mktemp("s3")
    values = subject_values(6, writer91k.geometry.n_elements, seed=21)
    values[2, :100] = np.nan
    csv = write_cohort(root / "local", writer91k, values)
    return root, pd.read_csv(csv), csv


@pytest.fixture(scope="module")
def servers(data):
    """An open moto server (buckets 'private' and 'public', the latter readable unsigned), and
    one that enforces IAM after its setup (bucket 'private', users 'reader' and 'nobody')."""
    root, table, _ = data
    open_, iam = Server(), Server(auth_after=7)
    open_.wait(), iam.wait()
    s3 = open_.client()
    for bucket in ("private", "public"):
        s3.create_bucket(Bucket=bucket)
        for source in table["source_file"]:
            s3.upload_file(str(root / "local" / source), bucket, f"cohort/{source}")
    s3.put_bucket_policy(Bucket="public", Policy=json.dumps(PUBLIC_READ))

    import boto3

    setup = iam.client()  # 7 requests, counted by moto before it enforces IAM
    users = boto3.client("iam", endpoint_url=iam.url, region_name="us-east-1", **_lower(KEYS))
    setup.create_bucket(Bucket="private")
    first = root / "local" / table["source_file"][0]
    setup.put_object(
        Bucket="private", Key=f"cohort/{table['source_file'][0]}", Body=first.read_bytes()
    )
    read = {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::private/*"}
    users.create_user(UserName="reader")
    users.put_user_policy(
        UserName="reader",
        PolicyName="read",
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [read]}),
    )
    reader = users.create_access_key(UserName="reader")["AccessKey"]
    users.create_user(UserName="nobody")
    nobody = users.create_access_key(UserName="nobody")["AccessKey"]
    yield {"open": open_, "iam": iam, "reader": reader, "nobody": nobody}
    open_.stop(), iam.stop()


def _lower(keys: dict) -> dict:
    return {name.lower(): value for name, value in keys.items()}


def s3_cohort(folder: Path, table: pd.DataFrame, bucket: str, rows=None) -> Path:
    """The cohort with its source files as s3://BUCKET/cohort/<file>."""
    folder.mkdir(parents=True, exist_ok=True)
    remote = table.iloc[rows] if rows is not None else table
    remote = remote.assign(source_file=[f"s3://{bucket}/cohort/{s}" for s in remote["source_file"]])
    path = folder / "cohort.csv"
    remote.to_csv(path, index=False)
    return path


@pytest.fixture
def aws(monkeypatch, tmp_path):
    """An environment with no AWS settings but those a test gives (no ~/.aws, no role)."""
    for name in list(os.environ):
        if name.startswith("AWS_") or name == "MODELARRAYIO_S3_ANON":
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")

    def use(endpoint: str, **variables: str) -> None:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        for name, value in variables.items():
            monkeypatch.setenv(name, value)

    return use


def convert(csv: Path, output: Path, *flags: object, workers: int = 4):
    return run_greyarray(
        "to-modelarray", "--cohort-file", csv, "--output", output, "--s3-workers", workers, *flags
    )


def one_error(done, code: int, *parts: str) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("greyarray: error:")]
    assert done.returncode == code and len(lines) == 1, done.stderr
    assert all(part in lines[0] for part in parts), lines[0]
    return lines[0]


def nothing_left(folder: Path) -> None:
    assert not list(folder.rglob("*.h5")) and not list(folder.rglob(".greyarray-tmp*"))


def test_s3_cohort_equals_the_local_one(data, servers, aws, tmp_path):
    """Credentials from the environment, AWS_ENDPOINT_URL honoured: the HDF5 holds the values
    and non-finite counts of the local conversion of the same files, the sha256 of the same
    bytes, and the s3:// strings as subject names and paths; the URL is never looked up in the
    CSV's folder (a local file there at the URL's path is ignored); no spool is left."""
    root, table, local_csv = data
    aws(servers["open"].url, **KEYS)
    csv = s3_cohort(tmp_path / "cohort", table, "private")
    decoy = tmp_path / "cohort" / "s3:" / "private" / "cohort" / table["source_file"][0]
    decoy.parent.mkdir(parents=True)
    decoy.write_bytes((root / "local" / table["source_file"][1]).read_bytes())
    done = convert(csv, tmp_path / "out" / "s3.h5")
    assert done.returncode == 0, done.stderr
    assert (
        run_greyarray(
            "to-modelarray", "--cohort-file", local_csv, "--output", tmp_path / "local.h5"
        ).returncode
        == 0
    )
    urls = list(pd.read_csv(csv)["source_file"])
    with h5py.File(tmp_path / "out" / "s3.h5") as s3, h5py.File(tmp_path / "local.h5") as local:
        np.testing.assert_array_equal(
            s3["scalars/thickness/values"][()], local["scalars/thickness/values"][()]
        )
        for name in ("sha256", "nonfinite_count"):
            np.testing.assert_array_equal(
                s3[f"greyarray/sources/thickness/{name}"][()],
                local[f"greyarray/sources/thickness/{name}"][()],
            )
        assert list(s3["scalars/thickness/column_names"].asstr()[()]) == urls
        assert list(s3["greyarray/sources/thickness/path"].asstr()[()]) == urls
        assert s3["greyarray/sources/thickness/nonfinite_count"][2] == 100
    assert not list(tmp_path.rglob(".greyarray-tmp*"))
    # the same cohort CSV for the model (rows matched by the s3:// names) and for the export,
    # whose template is the first object's header
    h5 = tmp_path / "out" / "s3.h5"
    fit = ["fit-lm", "--input-hdf5", h5, "--cohort-file", csv, "--formula", "thickness ~ age"]
    assert run_greyarray(*fit).returncode == 0
    export = ["export-results", "--analysis-name", "lm", "--input-hdf5", h5, "--cohort-file", csv]
    done = run_greyarray(*export, "--output-dir", tmp_path / "maps")
    assert done.returncode == 0 and len(list((tmp_path / "maps").glob("*.dscalar.nii"))) > 5


def test_public_bucket_read_unsigned(data, servers, aws, tmp_path):
    """No credentials anywhere: refused with 77 (and how to read a public bucket); with
    MODELARRAYIO_S3_ANON=1 the public bucket is read unsigned, and the private one is denied."""
    _, table, _ = data
    aws(servers["open"].url)
    public = s3_cohort(tmp_path / "public", table, "public", rows=[0, 1, 2])
    done = convert(public, tmp_path / "none.h5")
    one_error(done, 77, "s3://public/cohort/", "no AWS credentials", "MODELARRAYIO_S3_ANON=1")
    nothing_left(tmp_path)
    aws(servers["open"].url, MODELARRAYIO_S3_ANON="1")
    assert convert(public, tmp_path / "public.h5").returncode == 0
    with h5py.File(tmp_path / "public.h5") as h5:
        assert h5["scalars/thickness/values"].shape == (3, 91282)
    private = s3_cohort(tmp_path / "private", table, "private", rows=[0, 1, 2])
    done = convert(private, tmp_path / "private.h5")
    one_error(done, 77, "s3://private/cohort/maps/sub-001_thickness", "access denied", "unsigned")


def test_missing_bucket_or_key(data, servers, aws, tmp_path):
    _, table, _ = data
    aws(servers["open"].url, **KEYS)
    csv = s3_cohort(tmp_path / "a", table, "private")
    text = csv.read_text().replace("sub-004_thickness", "sub-404_thickness")
    csv.write_text(text)
    done = convert(csv, tmp_path / "out.h5")
    one_error(done, 66, "s3://private/cohort/maps/sub-404_thickness.dscalar.nii: no such key")
    csv = s3_cohort(tmp_path / "b", table, "nonexistent")
    one_error(convert(csv, tmp_path / "out.h5"), 66, "no such bucket 'nonexistent'")
    nothing_left(tmp_path)


def test_access_denied_by_iam(data, servers, aws, tmp_path):
    """A server that authenticates every request (IAM): a user allowed s3:GetObject reads;
    a user without that permission, and an unknown access key, are denied (77)."""
    _, table, _ = data
    csv = s3_cohort(tmp_path / "c", table, "private", rows=[0])
    for user, code, says in (
        ("nobody", 77, "access denied (AccessDenied"),
        ("unknown", 77, "access denied (InvalidAccessKeyId"),
        ("reader", 0, ""),
    ):
        key = servers.get(user, {"AccessKeyId": "AKIAUNKNOWN", "SecretAccessKey": "x"})
        aws(
            servers["iam"].url,
            AWS_ACCESS_KEY_ID=key["AccessKeyId"],
            AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"],
        )
        done = convert(csv, tmp_path / f"{user}.h5")
        if code:
            one_error(done, code, "s3://private/cohort/maps/sub-001_thickness.dscalar.nii", says)
        else:
            assert done.returncode == 0, done.stderr
    assert [p.name for p in tmp_path.glob("*.h5")] == ["reader.h5"]


class Faults(http.server.ThreadingHTTPServer):
    """A proxy in front of moto that answers 503 to the first GET of each key (``first``) or to
    every GET (``always``), or (``cut``) sends half of the first GET's body and closes the
    connection, after calling ``on_cut(path)``; it records what it did in ``failed``."""

    def __init__(self, upstream: str, mode: str, on_cut=None):
        self.upstream, self.mode, self.on_cut = upstream, mode, on_cut
        self.failed, self.ranges, self.lock = [], [], threading.Lock()
        super().__init__(("127.0.0.1", 0), _Proxy)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _Proxy(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        with server.lock:
            fail = server.mode == "always" or self.path not in server.failed
            if fail:
                server.failed.append(self.path)
        if fail and server.mode != "cut":
            body = b"<Error><Code>ServiceUnavailable</Code><Message>try again</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        server.ranges.append((self.headers.get("Range"), self.headers.get("If-Match")))
        host = server.upstream.removeprefix("http://")
        upstream = http.client.HTTPConnection(host, timeout=30)
        upstream.request("GET", self.path, headers=dict(self.headers))
        answer = upstream.getresponse()
        data = answer.read()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fail:  # cut: half of the body, then the connection closes
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            server.on_cut(self.path)
            self.close_connection = True
            return
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_transient_5xx_is_retried(data, servers, aws, tmp_path):
    """Every object's first GET answered 503: retried (botocore's standard mode), the cohort
    converts; an endpoint answering 503 every time ends in 69 naming it, after the attempts."""
    _, table, _ = data
    csv = s3_cohort(tmp_path / "d", table, "private", rows=[0, 1, 2])
    proxy = Faults(servers["open"].url, "first")
    aws(proxy.url, **KEYS)
    assert convert(csv, tmp_path / "retried.h5").returncode == 0
    assert len(proxy.failed) == 3
    proxy.shutdown()
    proxy = Faults(servers["open"].url, "always")
    aws(proxy.url, **KEYS)
    done = convert(s3_cohort(tmp_path / "e", table, "private", rows=[0]), tmp_path / "failed.h5")
    one_error(done, 69, f"{proxy.url}: S3 endpoint answered 503", "after 2 attempts")
    assert len(proxy.failed) == 2  # AWS_MAX_ATTEMPTS=2
    proxy.shutdown()
    assert [p.name for p in tmp_path.glob("*.h5")] == ["retried.h5"]


def test_broken_stream_resumes_from_the_same_object(data, servers, aws, tmp_path):
    """A connection cut in the middle of each object: the read resumes where it stopped (a
    Range request with If-Match on the ETag) and the sha256 is the whole file's. An object
    replaced before the resumed read is refused (65): never a mix of two versions."""
    root, table, _ = data
    s3 = servers["open"].client()
    s3.create_bucket(Bucket="changing")
    files = [root / "local" / f for f in table["source_file"][:2]]
    for path in files:
        s3.upload_file(str(path), "changing", f"cohort/maps/{path.name}")
    csv = s3_cohort(tmp_path / "f", table, "changing", rows=[0, 1])
    proxy = Faults(servers["open"].url, "cut", on_cut=lambda path: None)
    aws(proxy.url, **KEYS)
    assert convert(csv, tmp_path / "resumed.h5").returncode == 0
    assert len(proxy.failed) == 2
    resumed = [r for r in proxy.ranges if r[0]]  # the first GETs asked for the whole object
    assert len(resumed) == 2 and all(r.startswith("bytes=") and etag for r, etag in resumed)
    with h5py.File(tmp_path / "resumed.h5") as h5:
        shas = list(h5["greyarray/sources/thickness/sha256"].asstr()[()])
    assert shas == [hashlib.sha256(path.read_bytes()).hexdigest() for path in files]
    proxy.shutdown()

    def replace(path: str) -> None:
        s3.put_object(Bucket="changing", Key=path.split("/", 2)[2], Body=files[1].read_bytes())

    proxy = Faults(servers["open"].url, "cut", on_cut=replace)
    aws(proxy.url, **KEYS)
    done = convert(csv, tmp_path / "changed.h5", workers=1)
    one_error(done, 65, "s3://changing/cohort/maps/sub-001", "changed while it was being read")
    proxy.shutdown()
    assert not (tmp_path / "changed.h5").exists() and not list(tmp_path.rglob(".greyarray-tmp*"))


def test_server_stopped_mid_run(servers, aws, tmp_path):
    """The S3 server stops while the cohort is being read: after bounded retries the run ends
    with 69 naming the endpoint; no output, no temporary file (the spool is removed)."""
    server = Server().wait()
    s3 = server.client()
    s3.create_bucket(Bucket="cohort")
    data = PSCALAR.read_bytes()
    urls = []
    for i in range(40):
        s3.put_object(Bucket="cohort", Key=f"sub-{i:02d}.pscalar.nii", Body=data)
        urls.append(f"s3://cohort/sub-{i:02d}.pscalar.nii")
    csv = tmp_path / "cohort.csv"
    pd.DataFrame({"scalar_name": "coverage", "source_file": urls}).to_csv(csv, index=False)
    env = {**os.environ, **KEYS, "AWS_ENDPOINT_URL": server.url, "AWS_MAX_ATTEMPTS": "2"}
    out = tmp_path / "out"
    out.mkdir()
    run = subprocess.Popen(
        [*GREYARRAY, "--cohort-file", csv, "--output", out / "c.h5", "--s3-workers=1", "--map=1"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 60
    while not list(out.glob(".greyarray-tmp*/*.data")):  # reading has begun
        assert run.poll() is None and time.monotonic() < deadline, run.stderr.read()
        time.sleep(0.005)
    run.send_signal(signal.SIGSTOP)
    server.stop()
    run.send_signal(signal.SIGCONT)
    _, stderr = run.communicate(timeout=60)
    done = subprocess.CompletedProcess(run.args, run.returncode, "", stderr)
    one_error(done, 69, f"{server.url}: S3 endpoint unreachable after 2 attempts", "s3://cohort/")
    nothing_left(out)


@pytest.mark.parametrize("url", ["s3://bucket-only", "s3:///key", "s3://bucket/folder/"])
def test_not_an_object_url(tmp_path, url):
    """An s3:// string that names no object: one line (64) before any request."""
    pd.DataFrame({"scalar_name": ["fa"], "source_file": [url]}).to_csv(tmp_path / "c.csv")
    done = convert(tmp_path / "c.csv", tmp_path / "o.h5")
    one_error(done, 64, "c.csv: line 2:", repr(url), "not an S3 object (expected s3://bucket/key)")
    nothing_left(tmp_path)


MODELARRAYIO_DATA = Path(__file__).parent / "data" / "modelarrayio"
VOXELS, FIXELS = MODELARRAYIO_DATA / "voxels", MODELARRAYIO_DATA / "fixels"
GROUP_MASK = ("--mask", VOXELS / "group_mask.nii.gz")
FIXEL_INDEX = (
    "--index-file",
    FIXELS / "template" / "index.mif",
    "--directions-file",
    FIXELS / "template" / "directions.mif",
)
URL_COLUMNS = ("column_names", "path", "mask_path")  # the cohort's strings: URLs or local paths


def upload_cohort(s3, folder: Path, bucket: str, out: Path, drop: str | None = None) -> Path:
    """``folder``'s cohort (and its files, but ``drop``) on S3: a CSV whose source_file and
    source_mask_file are s3://BUCKET/<folder name>/<file>."""
    table = pd.read_csv(folder / "cohort.csv", dtype=str)
    s3.create_bucket(Bucket=bucket)
    columns = [c for c in ("source_file", "source_mask_file") if c in table]
    for name in {f for c in columns for f in table[c]} - {drop}:
        s3.upload_file(str(folder / name), bucket, f"{folder.name}/{name}")
    for column in columns:
        table[column] = [f"s3://{bucket}/{folder.name}/{f}" for f in table[column]]
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "cohort.csv", index=False)
    return out / "cohort.csv"


def assert_same_hdf5(remote: Path, local: Path) -> None:
    """Every dataset and attribute equal (values bit for bit, NaN where NaN), but the cohort's
    strings, which are the S3 URLs of the local files' names, and the run's time and command."""
    with h5py.File(remote) as a, h5py.File(local) as b:
        names_a, names_b = [], []
        a.visit(names_a.append), b.visit(names_b.append)
        assert names_a == names_b
        for name in names_a:
            x, y = a[name], b[name]
            if name != "greyarray":
                assert sorted(x.attrs) == sorted(y.attrs), name
                for key in x.attrs:
                    np.testing.assert_array_equal(x.attrs[key], y.attrs[key], err_msg=name)
            if not isinstance(x, h5py.Dataset):
                continue
            assert x.dtype == y.dtype and x.shape == y.shape, name
            if name.rsplit("/", 1)[-1] in URL_COLUMNS:
                urls, paths = x.asstr()[()], y.asstr()[()]
                assert all(u.startswith("s3://") for u in urls), name
                assert [u.rsplit("/", 1)[-1] for u in urls] == [Path(p).name for p in paths]
            elif x.dtype.kind == "f":
                assert np.array_equal(x[()], y[()], equal_nan=True), name
            else:
                assert np.array_equal(x[()], y[()]), name


def test_nifti_cohort_with_subject_masks_on_s3(servers, aws, tmp_path):
    """NIfTI maps (.nii and .nii.gz) and their subject masks as S3 objects, the group mask
    local: the HDF5 equals the local conversion's (values, NaN outside subject masks, voxels
    table, grid, sha256 of maps and masks), with the URLs as column names and paths; the
    spool copies are gone."""
    s3 = servers["open"].client()
    aws(servers["open"].url, **KEYS)
    csv = upload_cohort(s3, VOXELS, "voxels", tmp_path / "s3")
    done = convert(csv, tmp_path / "out" / "s3.h5", *GROUP_MASK)
    assert done.returncode == 0, done.stderr
    local = run_greyarray(
        "to-modelarray",
        "--cohort-file",
        VOXELS / "cohort.csv",
        "--output",
        tmp_path / "l.h5",
        *GROUP_MASK,
    )
    assert local.returncode == 0, local.stderr
    assert_same_hdf5(tmp_path / "out" / "s3.h5", tmp_path / "l.h5")
    with h5py.File(tmp_path / "out" / "s3.h5") as h5:
        masks = list(h5["greyarray/sources/FA/mask_path"].asstr()[()])
        assert masks == list(pd.read_csv(csv)["source_mask_file"])
        assert np.isnan(h5["scalars/FA/values"][()]).sum() > 100
    assert not list(tmp_path.rglob(".greyarray-tmp*"))


def test_fixel_cohort_on_s3(servers, aws, tmp_path):
    """Fixel data (.mif and .mif.gz) as S3 objects, index and directions local: the HDF5
    equals the local conversion's."""
    s3 = servers["open"].client()
    aws(servers["open"].url, **KEYS)
    csv = upload_cohort(s3, FIXELS, "fixels", tmp_path / "s3")
    done = convert(csv, tmp_path / "s3.h5", *FIXEL_INDEX, workers=2)
    assert done.returncode == 0, done.stderr
    local = run_greyarray(
        "to-modelarray",
        "--cohort-file",
        FIXELS / "cohort.csv",
        "--output",
        tmp_path / "l.h5",
        *FIXEL_INDEX,
    )
    assert local.returncode == 0, local.stderr
    assert_same_hdf5(tmp_path / "s3.h5", tmp_path / "l.h5")
    assert not list(tmp_path.rglob(".greyarray-tmp*"))


def test_missing_subject_mask_object(servers, aws, tmp_path):
    """A subject mask missing from the bucket: 66 naming the object, nothing written."""
    s3 = servers["open"].client()
    aws(servers["open"].url, **KEYS)
    csv = upload_cohort(s3, VOXELS, "nomask", tmp_path / "c", drop="sub-03_mask.nii.gz")
    done = convert(csv, tmp_path / "out.h5", *GROUP_MASK)
    one_error(done, 66, "s3://nomask/voxels/sub-03_mask.nii.gz: no such key in bucket 'nomask'")
    nothing_left(tmp_path)


@pytest.mark.parametrize(
    ("folder", "flags", "named"),
    [
        (VOXELS, ("--mask", "s3://b/group_mask.nii.gz"), "--mask s3://b/group_mask.nii.gz"),
        (FIXELS, ("--index-file", "s3://b/i.mif", *FIXEL_INDEX[2:]), "--index-file s3://b/i"),
        (FIXELS, (*FIXEL_INDEX[:2], "--directions-file", "s3://b/d.mif"), "--directions-file"),
    ],
)
def test_space_files_are_local_only(tmp_path, folder, flags, named):
    """The group mask and the fixel index and directions are read from local files: an
    s3:// one is refused in one line (64) naming the flag, before anything is read."""
    done = convert(folder / "cohort.csv", tmp_path / "o.h5", *flags)
    one_error(done, 64, named, "local file only")
    nothing_left(tmp_path)
