"""A real MinIO server on loopback for tests: S3 semantics without a cloud account.

``stop()`` then ``start()`` keeps the data directory and the port, so a test can simulate an S3
outage and its recovery.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any

from tests.cluster.processes import ManagedProcess, find_binary, free_port, http_ok, wait_until

REGION = "us-east-1"


class MinioServer:
    def __init__(
        self,
        data_dir: Path,
        *,
        log_dir: Path | None = None,
        port: int | None = None,
        binary: Path | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.data_dir = data_dir
        self.log_dir = log_dir or data_dir.parent / "logs"
        self.binary = binary or find_binary("minio")
        self.port = port or free_port()
        self.console_port = free_port()
        self.access_key = "cc-" + secrets.token_hex(6)
        self.secret_key = secrets.token_urlsafe(24)
        self.die_with_parent = die_with_parent
        self._process: ManagedProcess | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.log_dir / "minio.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def env(self) -> dict[str, str]:
        """What a worker needs in its environment to reach this server with boto3."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "S3_ENDPOINT_URL": self.endpoint_url,
        }

    def start(self, timeout: float = 60.0) -> None:
        if self._process is not None and self._process.alive():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            {
                "MINIO_ROOT_USER": self.access_key,
                "MINIO_ROOT_PASSWORD": self.secret_key,
                "MINIO_REGION": REGION,
                # No update checks or phone-home: tests run offline.
                "MINIO_UPDATE": "off",
                "MINIO_CALLHOME_ENABLE": "off",
                "HOME": str(self.data_dir.parent),
            }
        )
        self._process = ManagedProcess(
            name="minio",
            argv=[
                str(self.binary),
                "server",
                str(self.data_dir),
                "--address",
                f"127.0.0.1:{self.port}",
                "--console-address",
                f"127.0.0.1:{self.console_port}",
                "--quiet",
            ],
            log_file=self.log_file,
            env=env,
            die_with_parent=self.die_with_parent,
        )
        self._process.start()
        wait_until(
            lambda: http_ok(f"{self.endpoint_url}/minio/health/ready"),
            timeout,
            f"MinIO on {self.endpoint_url}",
            processes=[self._process],
        )

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None

    def client(self) -> Any:
        """A boto3 S3 client for this server (path-style addressing: no wildcard DNS here)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def make_bucket(self, name: str) -> None:
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)

    def __enter__(self) -> MinioServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
