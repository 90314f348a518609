"""A credential in a URL template or in the metadata never reaches a plan, a marker, the catalog, a
summary or a log; a template's credential still reaches its own mirror."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from commoncanvas.sample import build_sample, url_templates
from commoncanvas.sample.server import LocalHTTPServer

pytestmark = pytest.mark.integration
SECRET = "hunter2-mirror-password"


def test_a_planted_password_reaches_the_mirror_and_nothing_written(tmp_path: Path) -> None:
    www = tmp_path / "sample"
    www.mkdir()
    with LocalHTTPServer(root=www / "www", basic_auth=f"mirror:{SECRET}") as server:
        credentialed = server.base_url.replace("http://", f"http://mirror:{SECRET}@")
        sample = build_sample(www, credentialed)  # page and download URLs in the metadata carry it too
        output = tmp_path / "catalog"
        job = {
            "apiVersion": "commoncanvas.dev/v1alpha1",
            "kind": "ScrapeJob",
            "metadata": {"name": "secret"},
            "spec": {
                "source": {"uri": str(sample.metadata)},
                "output": {"uri": str(output)},
                "fetch": {
                    **url_templates(credentialed),
                    "retries": 0,
                    "allowPrivateNetworks": True,
                    "allowedHosts": ["127.0.0.1"],
                },
                "unitSize": 5,
                "parallelism": 2,
            },
        }
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
        cli = Path(sys.executable).parent / "commoncanvas"
        done = subprocess.run(
            [str(cli), "-v", "run", str(tmp_path / "job.yaml"), "--no-progress"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    written = list(output.rglob("*"))
    assert any(p.name.endswith(".mds") for p in written), "the template's credential must reach the mirror"
    for path in written:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"{path.relative_to(output)} holds the password"
    assert SECRET not in done.stdout and SECRET not in done.stderr
