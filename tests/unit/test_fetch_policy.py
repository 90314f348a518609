"""The fetch SSRF policy's tables: which hosts and addresses a ScrapeJob may fetch from."""

from __future__ import annotations

import pytest

from commoncanvas.scrape.fetch import HostPolicy, robots_opt_out
from commoncanvas.specs.scrape import FetchPolicy

REFUSED_BY_DEFAULT = {
    "127.0.0.1": "loopback",
    "::1": "loopback",
    "10.1.2.3": "private",
    "172.16.0.1": "private",
    "192.168.1.1": "private",
    "fc00::1": "private",
    "100.64.0.1": "CGNAT",
    "169.254.1.1": "link-local",
    "fe80::1": "link-local",
    "224.0.0.1": "multicast",
    "ff02::1": "multicast",
    "0.0.0.0": "unspecified",
    "::ffff:10.0.0.1": "private",
    "169.254.169.254": "cloud metadata",
    "fd00:ec2::254": "cloud metadata",
}


@pytest.mark.parametrize(("address", "kind"), REFUSED_BY_DEFAULT.items())
def test_internal_addresses_are_refused_by_default(address: str, kind: str) -> None:
    refusal = HostPolicy(FetchPolicy()).address_refusal(address)
    assert refusal is not None and kind in refusal


@pytest.mark.parametrize("address", ["8.8.8.8", "2a00:1450:4001:80b::200e", "199.59.148.10"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert HostPolicy(FetchPolicy()).address_refusal(address) is None


def test_allowing_private_networks_still_refuses_cloud_metadata() -> None:
    policy = HostPolicy(FetchPolicy(allow_private_networks=True))
    refused = {a for a in REFUSED_BY_DEFAULT if policy.address_refusal(a) is not None}
    assert refused == {"169.254.169.254", "fd00:ec2::254"}


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("farm1.staticflickr.com", True),
        ("live.staticflickr.com", True),
        ("farm3.static.flickr.com", True),
        ("staticflickr.com.evil.example", False),
        ("evilstaticflickr.com", False),
        ("s.yimg.com", False),
        ("127.0.0.1", False),
    ],
)
def test_default_allowed_hosts_are_flickrs_photo_hosts(host: str, allowed: bool) -> None:
    assert HostPolicy(FetchPolicy()).host_allowed(host) is allowed


def test_robots_directives_for_another_agent_do_not_apply_to_us() -> None:
    assert robots_opt_out(["googlebot: noai", "nofollow"], "commoncanvas") is None
    assert (
        robots_opt_out(["googlebot: noai", "commoncanvas: noindex"], "commoncanvas")
        == "commoncanvas: noindex"
    )
