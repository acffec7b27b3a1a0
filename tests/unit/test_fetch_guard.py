"""The SSRF guard's address checks, with an injected resolver: no socket is opened by any of these tests."""

from __future__ import annotations

import pytest

from embedstream.config import FetchSettings
from embedstream.fetch.budget import ByteBudget
from embedstream.fetch.guard import AddressGuard, Refused, literal
from embedstream.fetch.references import Malformed, check_allowed, looks_like_reference, parse

PUBLIC = "93.184.216.34"  # documentation of a public address: only ever checked here, never contacted


def resolver(table):
    def resolve(host, port):
        return table[host]

    return resolve


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1", "127.8.9.10", "::1", "[::1]", "::ffff:127.0.0.1", "[::ffff:7f00:1]",
        "169.254.169.254", "fe80::1", "fd00:ec2::254",  # the cloud metadata addresses (IPv4, IPv6)
        "10.0.0.1", "172.16.5.4", "172.31.255.255", "192.168.1.1", "100.64.0.1", "fc00::1",
        "0.0.0.0", "::", "224.0.0.1", "ff02::1", "240.0.0.1", "255.255.255.255",
        "2130706433", "0x7f000001", "0x7F.1", "127.1", "0177.0.0.1", "017700000001",  # 127.0.0.1, other spellings
        "64:ff9b::a9fe:a9fe", "2002:7f00:1::", "::ffff:10.0.0.1",  # NAT64 / 6to4 / mapped carrying refused IPv4
    ],
)  # fmt: skip
def test_refused_literals(host):
    guard = AddressGuard(resolver={}.__getitem__)  # a literal is never resolved
    with pytest.raises(Refused):
        guard.address_for(host, 80)


def test_public_literals_pass_and_are_what_is_connected_to():
    guard = AddressGuard(resolver={}.__getitem__)
    assert guard.address_for(PUBLIC, 443) == PUBLIC
    assert guard.address_for("2606:4700::1111", 443) == "2606:4700::1111"


@pytest.mark.parametrize(
    ("spelling", "address"),
    [("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"), ("127.1", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"),
     ("3232235777", "192.168.1.1"), ("[::ffff:127.0.0.1]", "::ffff:7f00:1"), ("example.com", None),
     ("1.2.3.4.5", None), ("0x", None)],
)  # fmt: skip
def test_literals_are_read_as_the_c_resolver_reads_them(spelling, address):
    found = literal(spelling)
    assert (str(found) if found is not None else None) == address


def test_a_name_is_refused_when_any_address_it_resolves_to_is_refused():
    guard = AddressGuard(resolver=resolver({"mixed.example": [PUBLIC, "10.1.2.3"], "ok.example": [PUBLIC]}))
    with pytest.raises(Refused, match=r"mixed\.example resolves to 10\.1\.2\.3"):
        guard.address_for("mixed.example", 443)
    assert guard.address_for("ok.example", 443) == PUBLIC


def test_names_that_resolve_to_the_metadata_address_or_loopback_are_refused():
    table = {"metadata.example": ["169.254.169.254"], "lo.example": ["::1", "127.0.0.1"], "v6.example": ["fe80::1%2"]}
    guard = AddressGuard(resolver=resolver(table))
    for host in table:
        with pytest.raises(Refused):
            guard.address_for(host, 80)


def test_allowed_networks_let_only_what_they_name_through():
    table = {"store.internal": ["10.1.2.3"], "other.internal": ["10.9.9.9"]}
    guard = AddressGuard(["10.1.2.0/24", "127.0.0.2/32"], resolver(table))
    assert guard.address_for("store.internal", 80) == "10.1.2.3"
    assert guard.address_for("127.0.0.2", 80) == "127.0.0.2"
    for host in ("other.internal", "127.0.0.1", "169.254.169.254"):
        with pytest.raises(Refused):
            guard.address_for(host, 80)


def test_a_name_with_no_address_is_an_error_not_a_pass():
    guard = AddressGuard(resolver=resolver({"empty.example": []}))
    with pytest.raises(OSError):
        guard.address_for("empty.example", 80)


def settings(**kw):
    base = {"enabled": True, "allowed_schemes": ("s3", "https"), "allowed_hosts": (".example.com", "img.test"),
            "allowed_buckets": ("photos",)}  # fmt: skip
    return FetchSettings(**{**base, **kw})


@pytest.mark.parametrize(
    ("uri", "ok"),
    [("s3://photos/a/b.jpg", True), ("s3://other/a.jpg", False), ("s3://169.254.169.254/latest", False),
     ("https://cdn.example.com/x.png", True), ("https://example.com/x.png", False), ("https://img.test/x", True),
     ("https://img.test.evil.com/x", False), ("http://img.test/x", False), ("https://IMG.TEST./x", True)],
)  # fmt: skip
def test_allow_lists(uri, ok):
    ref = parse(uri)
    if ok:
        check_allowed(ref, settings())
    else:
        with pytest.raises(Refused):
            check_allowed(ref, settings())


def test_nothing_is_allowed_while_fetching_is_off():
    with pytest.raises(Refused, match=r"fetch\.enabled"):
        check_allowed(parse("s3://photos/a.jpg"), settings(enabled=False))


@pytest.mark.parametrize(
    "uri",
    [
        "ftp://x/y",
        "s3://bucket-only",
        "https://",
        "https://user:pw@img.test/x",
        "https://img.test/a b",
        "file:///etc/passwd",
    ],
)
def test_malformed_references(uri):
    with pytest.raises(Malformed):
        parse(uri)


def test_raw_values_that_are_references():
    assert looks_like_reference(b"s3://photos/a.jpg") and looks_like_reference(b"HTTPS://img.test/x")
    assert not looks_like_reference(b"\xff\xd8\xff\xe0") and not looks_like_reference(b"\x89PNG\r\n")
    assert not looks_like_reference(b"s3://" + b"x" * 3000)


def test_byte_budget_never_lends_more_than_it_has():
    import threading

    budget = ByteBudget(100)
    peak = []
    lock = threading.Lock()

    def borrow(n):
        got = budget.reserve(n)
        with lock:
            peak.append(budget.in_use)
        budget.release(got)

    threads = [threading.Thread(target=borrow, args=(n,)) for n in [40, 70, 30, 100, 250, 1] * 20]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert max(peak) <= 100 and budget.in_use == 0
    assert budget.reserve(10**9) == 100, "larger than the budget: all of it, never a deadlock"
