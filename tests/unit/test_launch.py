"""serve.launch: a started server never blocks on output nobody reads; failures show stderr."""

from __future__ import annotations

import sys
import textwrap

import httpx
import pytest

from shipyard.serve.launch import served, start_server
from shipyard.serve.settings import ServeError

# A stand-in server: prints its address, then writes ~300 bytes to stdout and stderr per request
# (as the access log does), far more than a pipe holds over 1000 requests.
CHATTY_SERVER = textwrap.dedent(
    """
    import sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            sys.stderr.write("access " + "x" * 300 + "\\n")
            sys.stderr.flush()
            print("out " + "y" * 300, flush=True)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"serving on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()
    """
)


def test_a_chatty_server_answers_1000_requests() -> None:
    server = served([sys.executable, "-c", CHATTY_SERVER], timeout_s=30)
    with server as url, httpx.Client(timeout=10) as client:
        for _ in range(1000):
            assert client.get(url + "/v2/health/ready").text == "ok"


def test_a_server_that_exits_is_reported_with_its_stderr() -> None:
    script = "import sys; print('up on http://127.0.0.1:9', flush=True); sys.exit('model broke')"
    with pytest.raises(ServeError, match=r"exited with code 1: model broke"):
        start_server([sys.executable, "-c", script], timeout_s=30)


def test_a_server_that_prints_no_address_is_reported() -> None:
    script = "import sys; sys.stderr.write('bad flag\\n')"
    with pytest.raises(ServeError, match=r"printed no address.*bad flag"):
        start_server([sys.executable, "-c", script], timeout_s=30)
