"""The 504 a hung worker sends on its way out (supervisor.worker.timeouts): one whole,
closing response, parsed here as a client would parse it."""
from __future__ import annotations

import http.client
import io

import pytest

from supervisor.worker.timeouts import response_for


class _Wire(io.BytesIO):
    def makefile(self, *args, **kwargs):
        return self


@pytest.mark.parametrize("method, body", [(b"GET", b"Gateway Timeout\n"), (b"POST", b"Gateway Timeout\n"),
                                          (b"HEAD", b"")])
def test_the_answer_is_a_whole_504_that_closes(method, body):
    wire = response_for(method)
    response = http.client.HTTPResponse(_Wire(wire), method=method.decode())
    response.begin()
    assert (response.status, response.reason) == (504, "Gateway Timeout")
    assert response.getheader("Connection") == "close" and response.will_close
    assert response.getheader("Date")
    assert response.read() == body
    assert wire.endswith(b"\r\n\r\n" + body)   # nothing after it
