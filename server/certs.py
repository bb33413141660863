"""Certificates and SuperNode keys for a deployment (`fedtune certs ...`), with `cryptography`.

Layout of a certificate directory (default `./certs`)::

    ca.crt                      the consortium CA (public; every site gets a copy)
    ca/ca.key                   the CA's private key (0600; keep it offline after issuing)
    server/server.crt|.key      the coordinator's TLS certificate (SANs: --host names + localhost)
    sites/<SITE>/site.key|.pub  a site's SuperNode authentication key pair (EC P-384, OpenSSH)
    registry/<SITE>.pub         public keys the coordinator registers with its SuperLink;
                                a SuperNode whose key is not listed here is refused

Private keys are created with mode 0600 and never overwritten unless `force=True` is passed
explicitly (the CLI's `--force`); an existing file is otherwise an error.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.common.atomic import atomic_write

SITE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
LOCAL_NAMES = ("localhost", "127.0.0.1")  # the coordinator's own Control/Runtime API clients


class CertError(ValueError):
    """A certificate operation that cannot proceed; the message says why and what to do."""


@dataclass(frozen=True)
class CertPaths:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server" / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server" / "server.key"

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    def site_dir(self, site_id: str) -> Path:
        return self.root / "sites" / site_id

    def site_key(self, site_id: str) -> Path:
        return self.site_dir(site_id) / "site.key"

    def site_pub(self, site_id: str) -> Path:
        return self.site_dir(site_id) / "site.pub"

    def registered(self, site_id: str) -> Path:
        return self.registry / f"{site_id}.pub"


def check_site_id(site_id: str) -> str:
    if not SITE_ID_RE.match(site_id):
        raise CertError(
            f"invalid site id {site_id!r}: use letters, digits, '.', '_' or '-' "
            "(at most 63 characters, starting with a letter or digit)"
        )
    return site_id


# ---------------------------------------------------------------------------------------------
# Writing files: never silently overwrite, private keys 0600 from the first byte.


def _refuse_existing(paths: list[Path], force: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        names = ", ".join(str(p) for p in existing)
        raise CertError(
            f"{names} already exist(s); refusing to overwrite (pass --force to replace)"
        )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically (temp file + rename) with `mode` set before any byte is written."""
    atomic_write(path, lambda fh: fh.write(data), mode=mode)


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey, fmt) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    _write(path, key.private_bytes(serialization.Encoding.PEM, fmt,
                                   serialization.NoEncryption()), 0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune consortium"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _load_ca(paths: CertPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not paths.ca_cert.exists() or not paths.ca_key.exists():
        raise CertError(
            f"no CA in {paths.root} (expected {paths.ca_cert} and {paths.ca_key}); "
            f"run `fedtune certs init --dir {paths.root}` first"
        )
    cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{paths.ca_key}: not an EC private key")
    return cert, key


# ---------------------------------------------------------------------------------------------
# The three operations behind `fedtune certs init | server | site`.


def init_ca(root: Path, *, days: int = 3650, name: str = "fedtune CA",
            force: bool = False) -> CertPaths:
    """Create the consortium CA (self-signed, EC P-384)."""
    paths = CertPaths(Path(root))
    _refuse_existing([paths.ca_cert, paths.ca_key], force)
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_private_key(paths.ca_key, key, serialization.PrivateFormat.PKCS8)
    _write(paths.ca_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return paths


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue_server_cert(root: Path, hosts: list[str], *, days: int = 825,
                      force: bool = False) -> CertPaths:
    """Issue the coordinator's TLS certificate, signed by the CA, valid for `hosts`.

    localhost and 127.0.0.1 are always added: the coordinator's own `flwr` CLI and ServerApp
    reach the SuperLink's Control and Runtime APIs locally over the same TLS certificate.
    """
    if not hosts:
        raise CertError("give at least one --host (the name or IP the sites connect to)")
    paths = CertPaths(Path(root))
    ca_cert, ca_key = _load_ca(paths)
    _refuse_existing([paths.server_cert, paths.server_key], force)
    names = list(dict.fromkeys([*hosts, *LOCAL_NAMES]))
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write_private_key(paths.server_key, key, serialization.PrivateFormat.PKCS8)
    _write(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return paths


def create_site_key(root: Path, site_id: str, *, force: bool = False) -> CertPaths:
    """Create a site's SuperNode key pair (EC P-384, OpenSSH format, as Flower expects)
    and register its public key with the coordinator (registry/<SITE>.pub)."""
    check_site_id(site_id)
    paths = CertPaths(Path(root))
    _refuse_existing([paths.site_key(site_id), paths.site_pub(site_id)], force)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private_key(paths.site_key(site_id), key, serialization.PrivateFormat.OpenSSH)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH)
    _write(paths.site_pub(site_id), pub + f" fedtune-site:{site_id}\n".encode(), 0o644)
    register_site_key(root, site_id, paths.site_pub(site_id), force=force)
    return paths


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise CertError(f"public key file not found: {path}") from None
    except (ValueError, TypeError) as e:
        raise CertError(f"{path}: not an OpenSSH public key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertError(f"{path}: SuperNode keys must be EC (NIST P-256/P-384/P-521)")
    return key


def register_site_key(root: Path, site_id: str, public_key: Path, *,
                      force: bool = False) -> Path:
    """Add a site's public key (made at the site, sent to the coordinator) to the registry."""
    check_site_id(site_id)
    paths = CertPaths(Path(root))
    key = load_public_key(public_key)
    data = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    target = paths.registered(site_id)
    if target.exists() and not force:
        if load_public_key(target).public_numbers() == key.public_numbers():
            return target  # same key again: nothing to do
        raise CertError(
            f"{target} already holds a different key for site {site_id!r}; "
            "refusing to overwrite (pass --force to replace it)"
        )
    for other in sorted(paths.registry.glob("*.pub")) if paths.registry.exists() else []:
        if other != target and load_public_key(other).public_numbers() == key.public_numbers():
            raise CertError(f"this public key is already registered as {other.stem!r}")
    _write(target, data + f" fedtune-site:{site_id}\n".encode(), 0o644)
    return target


def registered_keys(root: Path) -> dict[str, Path]:
    """site id -> public key file, for every key in the registry."""
    reg = CertPaths(Path(root)).registry
    return {p.stem: p for p in sorted(reg.glob("*.pub"))} if reg.exists() else {}


def describe_cert(path: Path) -> dict:
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n.value) for n in san]
    except x509.ExtensionNotFound:
        names = []
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "san": names,
    }
