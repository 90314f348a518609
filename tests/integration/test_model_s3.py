"""Model weights from a real MinIO: downloaded once per machine, even by processes racing for them."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from commoncanvas import models, storage
from commoncanvas.models import STAMP, ModelNotAvailableError, resolve_model_dir

pytestmark = pytest.mark.integration

# A pod's worker: waits for the start signal, resolves the model, reports how many objects it fetched.
RACER = """
import json, sys, time
from pathlib import Path
from commoncanvas import models, storage

uri, cache, go, ready = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
fetched = []
original = storage.S3Storage.download_file

def download_file(self, key, path):
    fetched.append(key)
    time.sleep(0.05)  # keep the download in progress while the other process arrives
    original(self, key, path)

storage.S3Storage.download_file = download_file
ready.touch()
while not go.exists():
    time.sleep(0.01)
path = models.resolve_model_dir(uri, None, cache)
print(json.dumps({"path": path, "fetched": len(fetched)}))
"""


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != STAMP
    }


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Subfolders (unet/, vae/, ...) exercise nested keys.
    return models.write_tiny_sd2(tmp_path_factory.mktemp("sd2") / "model")


def upload(local: Path, uri: str) -> int:
    target = storage.open_storage(uri)
    files = [p for p in sorted(local.rglob("*")) if p.is_file()]
    for path in files:
        target.upload_file(path.relative_to(local).as_posix(), path)
    return len(files)


def test_s3_model_is_downloaded_once_and_loads(
    minio: Any, s3_env: dict[str, str], tiny_sd2: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    minio.make_bucket("models-once")
    uri = "s3://models-once/sd2/tiny"
    upload(tiny_sd2, uri)
    cache = tmp_path / "cache"
    started = time.monotonic()
    local = resolve_model_dir(uri, "v1", cache)
    seconds = time.monotonic() - started
    assert Path(local).parent == cache and tree_digest(Path(local)) == tree_digest(tiny_sd2)
    assert json.loads((Path(local) / STAMP).read_text())["uri"] == uri
    # Second resolve: straight from the cache, without asking S3.
    minio.stop()
    try:
        assert resolve_model_dir(uri, "v1", cache) == local
    finally:
        minio.start()
    pipe = StableDiffusionPipeline.from_pretrained(local, safety_checker=None)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    print(f"downloaded the tiny SD2 from MinIO in {seconds:.2f}s")


def test_two_processes_resolving_at_once_download_once(
    minio: Any, s3_env: dict[str, str], tiny_sd2: Path, tmp_path: Path
) -> None:
    minio.make_bucket("models-race")
    uri = "s3://models-race/sd2"
    count = upload(tiny_sd2, uri)
    cache, go = tmp_path / "cache", tmp_path / "go"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, uri, str(cache), str(go), str(tmp_path / f"ready-{n}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        for n in range(2)
    ]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready-*"))) < 2:  # both have imported and poll for the signal
        assert time.monotonic() < deadline and all(r.poll() is None for r in racers), "racers did not start"
        time.sleep(0.05)
    go.touch()
    reports = []
    for racer in racers:
        out, err = racer.communicate(timeout=120)
        assert racer.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert reports[0]["path"] == reports[1]["path"]
    assert sorted(r["fetched"] for r in reports) == [0, count]  # one downloaded, the other waited
    assert tree_digest(Path(reports[0]["path"])) == tree_digest(tiny_sd2)
    assert not list(cache.glob(".*.part-*"))


def test_empty_s3_prefix_is_a_clear_error(minio: Any, s3_env: dict[str, str], tmp_path: Path) -> None:
    minio.make_bucket("models-empty")
    with pytest.raises(ModelNotAvailableError, match="no model files under s3://models-empty/nothing"):
        resolve_model_dir("s3://models-empty/nothing", None, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
