"""Secrets out of URLs and messages: what fetch details, storage errors, plans and markers print."""

from __future__ import annotations

import pytest

from commoncanvas.redact import bare_host, redact_text, redact_url


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("https://user:pw@mirror.example/a.jpg", "https://***@mirror.example/a.jpg"),
        ("https://token@mirror.example:8443/a.jpg", "https://***@mirror.example:8443/a.jpg"),
        ("https://farm1.staticflickr.com/2/3_4_b.jpg", "https://farm1.staticflickr.com/2/3_4_b.jpg"),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA/x&X-Amz-Signature=abc&size=b",
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&size=b",
        ),
        ("https://h/p?api_key=k1&access_token=t1&page=2", "https://h/p?api_key=***&access_token=***&page=2"),
        ("http://minio:secret@127.0.0.1:9000", "http://***@127.0.0.1:9000"),
    ],
)
def test_redact_url_masks_userinfo_and_secret_query_values(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_redact_text_masks_every_url_in_a_message() -> None:
    message = (
        "Could not connect to the endpoint URL: 'http://admin:hunter2@minio.local:9000/bucket?sig=xyz' "
        "after http://u:p@other/x"
    )
    redacted = redact_text(message)
    assert "hunter2" not in redacted and "admin" not in redacted and "xyz" not in redacted
    assert "'http://***@minio.local:9000/bucket?sig=***'" in redacted and "http://***@other/x" in redacted


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("https://user:pw@Farm1.StaticFlickr.com:443/a.jpg", "farm1.staticflickr.com"),
        ("http://[::1]:80/", "::1"),
    ],
)
def test_bare_host_is_the_host_name_alone(url: str, host: str) -> None:
    assert bare_host(url) == host


def test_a_password_in_the_object_store_endpoint_never_reaches_a_storage_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from commoncanvas import storage

    monkeypatch.setenv("S3_ENDPOINT_URL", "http://admin:hunter2@127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("COMMONCANVAS_S3_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    storage.s3_client.cache_clear()
    try:
        with pytest.raises(storage.StorageError) as raised:
            storage.open_storage("s3://bucket/prefix").read_bytes("x")
    finally:
        storage.s3_client.cache_clear()
    assert "hunter2" not in str(raised.value) and "127.0.0.1:9" in str(raised.value)
