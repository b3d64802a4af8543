"""moto's S3 server on loopback for the tests and the fault suites (`tests/` imports this, not the reverse).

``moto_s3()`` starts ``ThreadedMotoServer`` on 127.0.0.1 at a free port and yields its endpoint URL.
While it runs the environment holds dummy credentials (subprocesses inherit them; ``AWS_PROFILE`` is
unset so no real profile is read); both are restored afterwards. PutObject is serialised: moto checks
``If-None-Match`` and then writes, without a lock, whereas S3 does both atomically, so without the lock
two concurrent conditional writes of the same key could both succeed.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1, port 0 (a free one): its ``http://host:port`` endpoint."""
    from moto.s3.responses import S3Response
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in [*CREDENTIALS, "AWS_PROFILE"]}
    os.environ.update(CREDENTIALS)
    os.environ.pop("AWS_PROFILE", None)
    lock = threading.Lock()
    original = S3Response.put_object

    def put_object_atomically(self: S3Response) -> Any:
        with lock:
            return original(self)

    S3Response.put_object = put_object_atomically  # type: ignore[method-assign]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    try:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()
    finally:
        S3Response.put_object = original  # type: ignore[method-assign]
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
