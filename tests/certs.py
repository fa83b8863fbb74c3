"""Test certificates, made at test time (never committed): a CA and server certificates it
signs, written as PEM files. Used by the TLS tests of replicas, HAProxy and Redis.

    ca = TestCA()
    files = ca.write_server(tmp_path, sans=("localhost", "127.0.0.1", "127.0.0.2"))
    files.ca, files.cert, files.key, files.combined   # paths: ca.pem, server.pem, ...
    files.serial                                      # the server certificate's serial

or in one call: ``write_certs(tmp_path, sans)``.
"""

from __future__ import annotations

import datetime
import ipaddress
import pathlib
import socket
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS = ("localhost", "127.0.0.1", "127.0.0.2")
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True, key_cert_sign=True, crl_sign=True,
    content_commitment=False, key_encipherment=False, data_encipherment=False,
    key_agreement=False, encipher_only=False, decipher_only=False,
)  # fmt: skip


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class ServerFiles:
    ca: pathlib.Path  # the CA certificate: what clients trust
    cert: pathlib.Path  # server certificate (PEM)
    key: pathlib.Path  # its private key (PEM, unencrypted)
    combined: pathlib.Path  # cert + key in one file, as HAProxy's `crt` wants it
    serial: int


class TestCA:
    __test__ = False  # not a pytest test class

    def __init__(self, name: str = "combiner test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(CA_KEY_USAGE, critical=True)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, sans=DEFAULT_SANS, common_name: str = ""):
        """A new server key and certificate for sans (DNS names and IP addresses)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name or sans[0]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert, key

    def write_server(self, folder, sans=DEFAULT_SANS, name: str = "server") -> ServerFiles:
        """Write ca.pem, <name>.pem, <name>.key and <name>-combined.pem into folder. Files
        are replaced by rename, as a renewal tool would, so a reader never sees half a file."""
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cert, key = self.issue(sans)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = _pem_key(key)
        files = ServerFiles(
            ca=folder / "ca.pem",
            cert=folder / f"{name}.pem",
            key=folder / f"{name}.key",
            combined=folder / f"{name}-combined.pem",
            serial=cert.serial_number,
        )
        for path, data in (
            (files.ca, self.pem),
            (files.key, key_pem),
            (files.cert, cert_pem),
            (files.combined, cert_pem + key_pem),
        ):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            tmp.chmod(0o600)
            tmp.replace(path)
        return files


def write_certs(folder, sans=DEFAULT_SANS) -> ServerFiles:
    """A new CA and one server certificate for sans, written into folder."""
    return TestCA().write_server(folder, sans)


def peer_serial(host: str, port: int, ca: pathlib.Path, alpn=("h2",), server_name="") -> int:
    """Handshake with host:port (verifying against ca) and return the serial number of the
    certificate it presented. ALPN h2 by default, as a gRPC client offers."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(list(alpn))
    with socket.create_connection((host, port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=server_name or host) as tls:
            der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number
