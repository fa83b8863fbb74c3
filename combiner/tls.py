"""TLS for a replica's gRPC port and HTTP side, from --tls-cert / --tls-key
(docs/operations.md, "TLS").

The certificate is re-read when its files change, so a renewal (certbot, cert-manager, a
cron job) takes effect on the next handshake without a restart:

* gRPC: dynamic server credentials whose fetcher grpc calls on every new handshake; it
  stats both files (microseconds) and re-reads them only when they changed.
* HTTP: ssl.SSLContext objects that are re-loaded in place (new handshakes use the new
  chain, open connections keep theirs); ``watch()`` checks the files every few seconds.

A pair that does not load (a half-written renewal, a key that does not match) is refused
and the previous one stays in use; at start it is an error. No client certificate is
asked for: the 1.0.0 client never sends one (docs/protocol.md §15).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import tempfile
import threading
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger("combiner")

CHECK_EVERY = 2.0  # seconds between checks of the files for the HTTP side


class TLSConfigError(ValueError):
    """The TLS options or files cannot be used (says which and why)."""


def tls_paths(cert: str, key: str) -> tuple[str, str] | None:
    """(cert, key) when TLS is asked for, None when not; one without the other is an error."""
    if bool(cert) != bool(key):
        raise TLSConfigError("--tls-cert and --tls-key go together: give both or neither")
    return (cert, key) if cert else None


@dataclass(frozen=True)
class Pair:
    cert: bytes  # PEM chain, leaf first
    key: bytes  # PEM private key (unencrypted)
    serial: int  # the leaf's serial number (logged on reload)
    not_after: str


def _stamp(path: str) -> tuple:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def load_pair(cert_path: str, key_path: str) -> Pair:
    """Read and check a certificate chain and its private key, or raise TLSConfigError."""
    try:
        with open(cert_path, "rb") as f:
            cert = f.read()
    except OSError as exc:
        raise TLSConfigError(f"--tls-cert {cert_path}: {exc.strerror or exc}") from None
    try:
        with open(key_path, "rb") as f:
            key = f.read()
    except OSError as exc:
        raise TLSConfigError(f"--tls-key {key_path}: {exc.strerror or exc}") from None
    try:
        chain = x509.load_pem_x509_certificates(cert)
    except ValueError:
        raise TLSConfigError(f"--tls-cert {cert_path}: no PEM certificate in it") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except TypeError:
        raise TLSConfigError(f"--tls-key {key_path}: the key is encrypted") from None
    except ValueError:
        raise TLSConfigError(f"--tls-key {key_path}: no PEM private key in it") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if chain[0].public_key().public_bytes(*spki) != private.public_key().public_bytes(*spki):
        raise TLSConfigError(
            f"--tls-key {key_path} is not the key of the certificate in {cert_path}"
        )
    return Pair(cert, key, chain[0].serial_number, chain[0].not_valid_after_utc.isoformat())


class CertificateFiles:
    """One --tls-cert/--tls-key pair, followed on disk. Thread-safe: grpc's fetcher runs
    on a grpc thread, the HTTP side's checks on the event loop."""

    def __init__(self, cert_path: str, key_path: str) -> None:
        self.cert_path, self.key_path = cert_path, key_path
        self._lock = threading.Lock()
        self._stamp = self._read_stamp()
        self.pair = load_pair(cert_path, key_path)  # raises at start: a clear error
        self._failed_stamp: tuple | None = None
        self._contexts: list[ssl.SSLContext] = []
        # the loop the SSLContexts serve handshakes on (ssl_context() records it)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._grpc_config = self._grpc_configuration()
        self._grpc_served: Pair | None = None  # the pair grpc was last given
        self.reloads = 0

    def _read_stamp(self) -> tuple | None:
        try:
            return (_stamp(self.cert_path), _stamp(self.key_path))
        except OSError:
            return None

    def _grpc_configuration(self):
        return grpc.ssl_server_certificate_configuration([(self.pair.key, self.pair.cert)])

    def refresh(self) -> bool:
        """Re-read the files if they changed; True if a new pair is now in use."""
        stamp = self._read_stamp()
        if stamp is None or stamp == self._stamp or stamp == self._failed_stamp:
            return False
        with self._lock:
            if stamp == self._stamp:
                return False
            try:
                pair = load_pair(self.cert_path, self.key_path)
                self._reload_contexts(pair)
            except (TLSConfigError, ssl.SSLError, OSError) as exc:
                # Mid-renewal (cert written, key not yet) or broken: keep the old pair.
                if stamp != self._failed_stamp:
                    log.warning("TLS certificate not reloaded, keeping the current one: %s", exc)
                self._failed_stamp = stamp
                return False
            self._stamp, self._failed_stamp = stamp, None
            self.pair = pair
            self._grpc_config = self._grpc_configuration()
            self.reloads += 1
        log.info(
            "TLS certificate reloaded from %s (serial %x, valid until %s)",
            self.cert_path,
            pair.serial,
            pair.not_after,
        )
        return True

    def _reload_contexts(self, pair: Pair) -> None:
        """Load pair into the live SSLContexts on the loop that serves their handshakes.
        load_cert_chain sets the chain, then the key: from another thread (grpc's fetcher,
        watch's worker) a handshake in between met the new chain with the old key and
        failed (UNEXPECTED_EOF at the client, tests/test_tls.py). On the loop it cannot
        interleave; the one small temporary file it writes per renewal is the cost."""
        loop = self._loop
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if loop is None or loop is here or loop.is_closed():
            for context in self._contexts:
                _load_into(context, pair)
            return

        def load() -> None:
            try:
                for context in self._contexts:
                    _load_into(context, pair)
            except (ssl.SSLError, OSError) as exc:  # checked by load_pair: not expected
                log.warning("TLS certificate not loaded into the HTTP side: %s", exc)

        loop.call_soon_threadsafe(load)

    # --- gRPC -----------------------------------------------------------------------------

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Server credentials that follow the files (no client certificates asked for)."""
        with self._lock:
            self._grpc_served = self.pair
            initial = self._grpc_config
        return grpc.dynamic_ssl_server_credentials(
            initial, self._fetch, require_client_authentication=False
        )

    def _fetch(self):
        # grpc calls this on every new handshake; None means "keep what you have".
        try:
            self.refresh()
        except Exception:  # never let an exception escape into grpc's C core
            log.exception("TLS certificate check failed")
        with self._lock:
            if self._grpc_served is self.pair:
                return None
            self._grpc_served = self.pair
            return self._grpc_config

    # --- HTTP (ssl.SSLContext) --------------------------------------------------------------

    def ssl_context(self, alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
        """A server SSLContext with the current pair, re-loaded in place by refresh()."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(list(alpn))
        with self._lock:
            _load_into(context, self.pair)
            self._contexts.append(context)
            if self._loop is None:
                try:
                    self._loop = asyncio.get_running_loop()
                except RuntimeError:  # made outside a loop: reloads load where they run
                    pass
        return context

    async def watch(self, every: float = CHECK_EVERY) -> None:
        """Check the files every few seconds (for the SSLContexts; gRPC checks by itself)."""
        while True:
            await asyncio.sleep(every)
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:
                log.exception("TLS certificate check failed")


def _load_into(context: ssl.SSLContext, pair: Pair) -> None:
    # From the bytes load_pair checked, not from the paths again: a renewal written between
    # the check and this load gave the live context the new chain with the old key, and every
    # handshake failed (seen in tests/test_tls.py). ssl loads only from files, so the pair
    # goes through one private temporary file, gone when this returns.
    with tempfile.TemporaryDirectory(prefix="combiner-tls-") as scratch:  # mode 0700
        both = os.path.join(scratch, "pair.pem")
        with open(os.open(both, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(pair.key + b"\n" + pair.cert)
        context.load_cert_chain(both)


def from_options(cert: str, key: str) -> CertificateFiles | None:
    """The replica's certificate files (None without TLS), or TLSConfigError."""
    paths = tls_paths(cert, key)
    return None if paths is None else CertificateFiles(*paths)
