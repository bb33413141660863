"""`fedtune certs`: a CA, the coordinator's TLS certificate, site key pairs (cryptography)."""

from __future__ import annotations

import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedtune.server.certs import (
    CertError,
    CertPaths,
    create_site_key,
    describe_cert,
    init_ca,
    issue_server_cert,
    load_public_key,
    register_site_key,
    registered_keys,
)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def fedtune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedtune", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def test_cli_creates_ca_server_cert_and_site_keys(tmp_path: Path):
    for args in (["init"], ["server", "--host", "coord.example.org", "--host", "10.1.2.3"],
                 ["site", "hospital-a"]):
        res = fedtune("certs", *args, "--dir", "certs", cwd=tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
    paths = CertPaths(tmp_path / "certs")
    for key in (paths.ca_key, paths.server_key, paths.site_key("hospital-a")):
        assert mode(key) == 0o600, key
    assert mode(paths.ca_cert) == 0o644

    # The server certificate is signed by the CA and names every host (+ the local names).
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert set(describe_cert(paths.server_cert)["san"]) == {
        "coord.example.org", "10.1.2.3", "localhost", "127.0.0.1"}
    # ... and a real TLS handshake verifies it for a --host name, and for no other name.
    assert _handshake(paths, "coord.example.org") is None
    assert "mismatch" in str(_handshake(paths, "evil.example.org")).lower()

    # The site key is what flower-supernode loads (OpenSSH EC), its public key is registered.
    key = load_ssh_private_key(paths.site_key("hospital-a").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    registered = registered_keys(paths.root)
    assert list(registered) == ["hospital-a"]
    assert load_public_key(registered["hospital-a"]).public_numbers() == \
        key.public_key().public_numbers()


def _handshake(paths: CertPaths, hostname: str) -> Exception | None:
    """TLS handshake in memory: the site's view (CA only) against the coordinator's cert."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(paths.server_cert, paths.server_key)
    client_ctx = ssl.create_default_context(cafile=str(paths.ca_cert))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for end in (client, server):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as e:
                return e
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        try:
            client.do_handshake()
            server.do_handshake()
            return None
        except ssl.SSLWantReadError:
            continue
        except ssl.SSLError as e:
            return e
    return RuntimeError("handshake did not complete")


def test_existing_keys_are_never_overwritten_silently(tmp_path: Path):
    root = tmp_path / "certs"
    init_ca(root)
    issue_server_cert(root, ["coordinator"])
    create_site_key(root, "bank-1")
    paths = CertPaths(root)
    before = {p: p.read_bytes() for p in (paths.ca_key, paths.server_key, paths.site_key("bank-1"))}

    with pytest.raises(CertError, match="refusing to overwrite"):
        init_ca(root)
    with pytest.raises(CertError, match="refusing to overwrite"):
        issue_server_cert(root, ["coordinator"])
    with pytest.raises(CertError, match="refusing to overwrite"):
        create_site_key(root, "bank-1")
    res = fedtune("certs", "site", "bank-1", "--dir", str(root), cwd=tmp_path)
    assert res.returncode == 2 and "--force" in res.stderr
    assert {p: p.read_bytes() for p in before} == before  # untouched

    create_site_key(root, "bank-1", force=True)  # explicit replacement
    assert paths.site_key("bank-1").read_bytes() != before[paths.site_key("bank-1")]
    assert mode(paths.site_key("bank-1")) == 0o600
    # the registry follows the replaced key
    new = load_ssh_private_key(paths.site_key("bank-1").read_bytes(), None).public_key()
    assert load_public_key(paths.registered("bank-1")).public_numbers() == new.public_numbers()


def test_register_a_key_made_at_the_site(tmp_path: Path):
    coordinator, site = tmp_path / "coord", tmp_path / "site"
    init_ca(coordinator)
    create_site_key(site, "hospital-b")  # made at the hospital; only site.pub travels
    pub = CertPaths(site).site_pub("hospital-b")
    register_site_key(coordinator, "hospital-b", pub)
    register_site_key(coordinator, "hospital-b", pub)  # same key again: fine
    assert list(registered_keys(coordinator)) == ["hospital-b"]
    # the same key under another site's name, or another key under this name: refused
    with pytest.raises(CertError, match="already registered"):
        register_site_key(coordinator, "hospital-c", pub)
    create_site_key(site, "other")
    with pytest.raises(CertError, match="different key"):
        register_site_key(coordinator, "hospital-b", CertPaths(site).site_pub("other"))
    with pytest.raises(CertError, match="invalid site id"):
        create_site_key(site, "../evil")
    with pytest.raises(CertError, match="no CA"):
        issue_server_cert(tmp_path / "empty", ["x"])
