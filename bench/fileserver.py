"""A big file served for the download benchmarks: by Debian's nginx when it is installed (a
native server: its own CPU, a sendfile per request, is small beside the client's on 2 cores),
else by the simulator (`sim_process`). Either way storage's crc32c is sent in `x-goog-hash`,
as GCS sends it for a composite object, so the client checks it as it would there.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from orchestrator.transfer.verify import crc32c_extend

from .common import sim_process

NGINX_PATHS = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
BLOCK = 1024 * 1024


@dataclass(frozen=True)
class Served:
    server: str  # what served it, for the results
    urls: list[str]


def nginx() -> str | None:
    found = shutil.which("nginx")
    return found or next((p for p in NGINX_PATHS if os.access(p, os.X_OK)), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_file(path: Path, size: int) -> str:
    """`size` bytes that do not compress (a checkpoint's do not), and their crc32c (base64)."""
    block = os.urandom(BLOCK)
    crc = 0
    with path.open("wb") as fh:
        left = size
        while left:
            chunk = block[: min(left, BLOCK)]
            fh.write(chunk)
            crc = crc32c_extend(crc, chunk)
            left -= len(chunk)
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


_CONF = """
worker_processes 1;
daemon off;
master_process off;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {root}/tmp;
    proxy_temp_path {root}/tmp;
    fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp;
    scgi_temp_path {root}/tmp;
    server {{
        listen 127.0.0.1:{port};
        root {root}/files;
        location / {{ add_header x-goog-hash "crc32c={crc}" always; }}
    }}
}}
"""


@contextmanager
def _nginx_serving(binary: str, size: int, count: int) -> Iterator[Served]:
    with tempfile.TemporaryDirectory(prefix="dreamlook-bench-nginx-") as tmp:
        root = Path(tmp)
        (root / "files").mkdir()
        (root / "tmp").mkdir()
        crc = _write_file(root / "files" / "big.bin", size)
        port = _free_port()
        conf = root / "nginx.conf"
        conf.write_text(_CONF.format(root=root, port=port, crc=crc))
        proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(root)], stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"nginx did not start: {(root / 'error.log').read_text()}") from None
                    time.sleep(0.05)
            yield Served("nginx", [f"http://127.0.0.1:{port}/big.bin"] * count)
        finally:
            proc.terminate()
            proc.wait(10)


@contextmanager
def big_file(size: int, count: int, sim_urls: Callable[[str, str, int], list[str]]) -> Iterator[Served]:
    """`count` URLs of a file of `size` bytes: one file from nginx, or `count` from the simulator."""
    binary = nginx()
    if binary is not None:
        with _nginx_serving(binary, size, count) as served:
            yield served
        return
    with sim_process("--time-scale", "1000", "--checkpoint-bytes", str(size)) as sim:
        yield Served("the simulator (nginx is not installed)", sim_urls(sim.url, sim.key, count))
