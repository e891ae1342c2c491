"""A DVC remote on S3, against moto's S3 server on 127.0.0.1: push from one clone, pull into another.

Needs the S3 support of DVC and moto (`pip install dvc-s3 'moto[server]'`); skipped without them.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, run_env

pytest.importorskip("dvc_s3")
boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

BUCKET, PREFIX = "lmcore-team", "dvcstore"
CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}  # moto takes any
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def env() -> dict[str, str]:
    """No AWS setting of this machine reaches DVC, and nothing goes through a proxy."""
    out = {k: v for k, v in run_env().items() if not k.startswith("AWS_") and k.lower() not in
           ("http_proxy", "https_proxy", "all_proxy")}
    return {**out, "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}


def dvc(cwd: Path, *args: str) -> str:
    res = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=env(), capture_output=True, text=True,
                         check=False)
    if res.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return res.stdout


def git(cwd: Path, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def s3_endpoint():
    """moto's S3 on 127.0.0.1 (port 0: one the system has free), with an empty bucket."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield url, client
    finally:
        server.stop()


def set_credentials(repo: Path) -> None:
    """Credentials belong to a machine: .dvc/config.local, which git never sees."""
    for key, value in CREDENTIALS.items():
        dvc(repo, "remote", "modify", "--local", "team", key, value)


def test_push_and_pull_through_s3(tmp_path, s3_endpoint):
    url, client = s3_endpoint
    proj = tmp_path / "proj"
    (proj / "data/shards").mkdir(parents=True)
    rng = random.Random(0)
    files = {"data/shards/a.bin": rng.randbytes(3000), "data/shards/b.bin": rng.randbytes(1000),
             "data/notes.txt": b"tiny\n"}
    for rel, blob in files.items():
        (proj / rel).write_bytes(blob)
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=proj, check=True, env=env())
    dvc(proj, "add", "data")
    dvc(proj, "remote", "add", "-d", "team", f"s3://{BUCKET}/{PREFIX}")
    dvc(proj, "remote", "modify", "team", "endpointurl", url)
    dvc(proj, "remote", "modify", "team", "region", "us-east-1")
    set_credentials(proj)
    pushed = dvc(proj, "push")
    assert "4 files pushed" in pushed, pushed  # three files and the folder's listing

    keys = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX)["Contents"]}
    cache = proj / ".dvc/cache/files/md5"
    assert keys == {f"{PREFIX}/files/md5/{p.parent.name}/{p.name}" for p in cache.glob("*/*")}
    assert "in sync" in dvc(proj, "status", "--cloud")

    git(proj, "add", "-A")
    git(proj, "commit", "-qm", "data")
    assert "secret_access_key" not in (proj / ".dvc/config").read_text()
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(proj), str(clone)], check=True)
    assert not (clone / "data").exists()
    set_credentials(clone)  # the url and endpoint came with git
    pulled = dvc(clone, "pull")
    assert "4 files fetched" in pulled, pulled
    for rel, blob in files.items():
        assert (clone / rel).read_bytes() == blob, rel
    assert os.listdir(clone / "data/shards") == os.listdir(proj / "data/shards")
    assert dvc(clone, "status").strip().endswith("Data and pipelines are up to date.")
