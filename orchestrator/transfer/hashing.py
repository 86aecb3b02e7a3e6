"""Digests of a file that is fetched in several sittings: sha256 (what `SHA256SUMS` lists)
and md5 and crc32c (what storage's `x-goog-hash` says), whose running state can be saved after a
part and taken up again by another process, so a resumed upload into a bucket hashes
only the bytes it fetches.

hashlib cannot hand its state out, so this uses OpenSSL's `SHA256_CTX` and `MD5_CTX`
(plain C structures) from the libcrypto that CPython's hashlib links, through ctypes.
Where no libcrypto is found, `ResumableDigest.available()` is False and a resumed upload
starts its file over instead.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import functools

from .verify import crc32c_extend

STATE_TAG = b"dlb-ossl-2"  # saved with the state: a state from another layout is never taken up
SHA256_CTX_BYTES = 112  # unsigned int h[8], Nl, Nh, data[16], num, md_len
MD5_CTX_BYTES = 92  # unsigned int A, B, C, D, Nl, Nh, data[16], num


@functools.cache
def _libcrypto() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("crypto")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        for algorithm in ("SHA256", "MD5"):
            for step in ("Init", "Update", "Final"):
                getattr(lib, f"{algorithm}_{step}").restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return lib


class ResumableDigest:
    """sha256, md5 and crc32c of the bytes given so far, in order; `state()` after any of them."""

    def __init__(self, state: bytes | None = None) -> None:
        lib = _libcrypto()
        if lib is None:
            raise RuntimeError("no libcrypto: digests cannot be resumed here")
        self._lib = lib
        self._sha = ctypes.create_string_buffer(SHA256_CTX_BYTES)
        self._md5 = ctypes.create_string_buffer(MD5_CTX_BYTES)
        self.size = 0
        self.crc32c = 0
        if state is None:
            lib.SHA256_Init(self._sha)
            lib.MD5_Init(self._md5)
            return
        tag, size, sha, md5, crc = _unpack(state)  # ValueError: not a state this build saved
        if tag != STATE_TAG:
            raise ValueError("a digest state saved by another build")
        ctypes.memmove(self._sha, sha, SHA256_CTX_BYTES)
        ctypes.memmove(self._md5, md5, MD5_CTX_BYTES)
        self.size = size
        self.crc32c = crc

    @staticmethod
    def available() -> bool:
        return _libcrypto() is not None

    def update(self, data: bytes) -> None:
        self._lib.SHA256_Update(self._sha, data, ctypes.c_size_t(len(data)))
        self._lib.MD5_Update(self._md5, data, ctypes.c_size_t(len(data)))
        self.crc32c = crc32c_extend(self.crc32c, data)
        self.size += len(data)

    def state(self) -> bytes:
        """226 bytes: a tag, the byte count, the two C structures as they stand, the crc32c."""
        return (
            STATE_TAG + self.size.to_bytes(8, "little") + self._sha.raw + self._md5.raw + self.crc32c.to_bytes(4, "big")
        )

    def sha256_hex(self) -> str:
        out = ctypes.create_string_buffer(32)
        self._lib.SHA256_Final(out, ctypes.create_string_buffer(self._sha.raw, SHA256_CTX_BYTES))
        return out.raw.hex()

    def md5_b64(self) -> str:
        out = ctypes.create_string_buffer(16)
        self._lib.MD5_Final(out, ctypes.create_string_buffer(self._md5.raw, MD5_CTX_BYTES))
        return base64.b64encode(out.raw).decode()

    def crc32c_b64(self) -> str:
        return base64.b64encode(self.crc32c.to_bytes(4, "big")).decode()


def _unpack(state: bytes) -> tuple[bytes, int, bytes, bytes, int]:
    tag, raw = state[: len(STATE_TAG)], state[len(STATE_TAG) :]
    if len(raw) != 8 + SHA256_CTX_BYTES + MD5_CTX_BYTES + 4:
        raise ValueError("a digest state of the wrong length")
    size = int.from_bytes(raw[:8], "little")
    md5_end = 8 + SHA256_CTX_BYTES + MD5_CTX_BYTES
    crc = int.from_bytes(raw[md5_end:], "big")
    return tag, size, raw[8 : 8 + SHA256_CTX_BYTES], raw[8 + SHA256_CTX_BYTES : md5_end], crc
