"""Test PKI made with ``cryptography`` (tests and ``kvtier bench reliability``): a CA, a
server certificate for 127.0.0.1/localhost, a client certificate, and a second CA nobody
trusts."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    rogue_ca: str
    rogue_client_cert: str
    rogue_client_key: str


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[str, str]:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return str(path.with_suffix(".crt")), str(path.with_suffix(".key"))


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
          issuer_key: ec.EllipticCurvePrivateKey, ca: bool = False,
          server: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                          False), critical=True)
    elif server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                            critical=False)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_pki(d: Path) -> Pki:
    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in
            ("ca", "server", "client", "rogue", "rogue_client")}
    ca = _cert("kvtier test CA", keys["ca"], "kvtier test CA", keys["ca"], ca=True)
    rogue = _cert("rogue CA", keys["rogue"], "rogue CA", keys["rogue"], ca=True)
    ca_crt, _ = _write(d / "ca", keys["ca"], ca)
    rogue_crt, _ = _write(d / "rogue", keys["rogue"], rogue)
    s_crt, s_key = _write(d / "server", keys["server"], _cert(
        "127.0.0.1", keys["server"], "kvtier test CA", keys["ca"], server=True))
    c_crt, c_key = _write(d / "client", keys["client"], _cert(
        "engine", keys["client"], "kvtier test CA", keys["ca"]))
    r_crt, r_key = _write(d / "rogue_client", keys["rogue_client"], _cert(
        "intruder", keys["rogue_client"], "rogue CA", keys["rogue"]))
    return Pki(ca_crt, s_crt, s_key, c_crt, c_key, rogue_crt, r_crt, r_key)
