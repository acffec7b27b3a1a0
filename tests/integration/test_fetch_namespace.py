"""The SSRF guard against real sockets, inside a network namespace of its own (``unshare -n``).

In the namespace, loopback also carries the cloud metadata address 169.254.169.254 and the private
10.0.0.1 and 10.0.0.2, each with a honeypot that counts requests; nothing leaves the namespace. The
fetcher is refused 169.254.169.254 and 10.0.0.1 (directly and by redirect) and they see no request;
as a control, 10.0.0.2, named in ``fetch.allowed_networks``, is reached. Skipped where creating a
network namespace is not permitted.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent(
    """
    import json, subprocess, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"],
                ["ip", "addr", "add", "10.0.0.1/32", "dev", "lo"], ["ip", "addr", "add", "10.0.0.2/32", "dev", "lo"]):
        subprocess.run(cmd, check=True)

    hits = {}

    def honeypot(host, port, redirect_to=None):
        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            def log_message(self, *a):
                pass
            def do_GET(self):
                hits[host] = hits.get(host, 0) + 1
                if redirect_to and self.path.startswith("/redirect"):
                    self.send_response(302)
                    self.send_header("Location", redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = b"hello from " + host.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
        server = ThreadingHTTPServer((host, port), H)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()

    honeypot("169.254.169.254", 80)
    honeypot("10.0.0.1", 80)
    honeypot("10.0.0.2", 80, redirect_to="http://169.254.169.254/latest/meta-data/")

    from embedstream.config import FetchSettings
    from embedstream.fetch.fetcher import Fetcher

    fetcher = Fetcher(FetchSettings(
        enabled=True, allowed_schemes=("http",), timeout_s=2, retries=0,
        allowed_hosts=("169.254.169.254", "10.0.0.1", "10.0.0.2", "2852039166", "0xa9fea9fe", "169.254.43518"),
        allowed_networks=("10.0.0.2/32",),
    ))
    out = {}
    for uri in ("http://169.254.169.254/latest/meta-data/", "http://2852039166/latest/", "http://0xa9fea9fe/x",
                "http://169.254.43518/x", "http://10.0.0.1/x", "http://10.0.0.2/redirect", "http://10.0.0.2/ok"):
        result = fetcher.fetch(uri, lambda data: data.decode())
        out[uri] = result if isinstance(result, str) else getattr(result, "reason", repr(result))
    print(json.dumps({"results": out, "hits": hits}))
    """
)


def test_metadata_and_private_addresses_are_refused_and_never_reached():
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1): the namespace test needs util-linux")
    probe = subprocess.run([unshare, "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"creating a network namespace is not permitted here: {probe.stderr.strip()}")
    run = subprocess.run([unshare, "-n", sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    results, hits = report["results"], report["hits"]
    print(json.dumps(report, indent=1))
    for uri, outcome in results.items():
        if uri.endswith("/ok"):
            assert outcome == "hello from 10.0.0.2", "the control: an allowed address is reached"
        else:
            assert outcome == "fetch_refused", (uri, outcome)
    assert hits.get("169.254.169.254", 0) == 0 and hits.get("10.0.0.1", 0) == 0
    assert hits["10.0.0.2"] == 2, "the redirect and the control, nothing else"
