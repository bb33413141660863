"""`fedtune certs ...`: the consortium's CA, the coordinator's TLS certificate, site key pairs."""

from __future__ import annotations

from pathlib import Path

import typer

from fedtune.cli.console import console
from fedtune.cli.console import fail as _fail

certs_app = typer.Typer(
    help="Certificates and site keys: a CA, the coordinator's TLS certificate, site key pairs.",
    no_args_is_help=True,
)

CERTS_DIR_OPT = typer.Option(Path("certs"), "--dir", "-d", help="Certificate directory.")
FORCE_OPT = typer.Option(False, "--force", help="Replace existing files (never done silently).")


@certs_app.command("init")
def certs_init(
    dir_: Path = CERTS_DIR_OPT,
    days: int = typer.Option(3650, help="Validity of the CA certificate in days."),
    force: bool = FORCE_OPT,
) -> None:
    """Create the consortium's certificate authority (ca.crt, ca/ca.key)."""
    from fedtune.server.certs import CertError, init_ca

    try:
        paths = init_ca(dir_, days=days, force=force)
    except CertError as e:
        _fail(str(e))
    console.print(f"CA certificate: {paths.ca_cert}  (give a copy to every site)")
    console.print(f"CA private key: {paths.ca_key}  (mode 600; keep it offline)")


@certs_app.command("server")
def certs_server(
    host: list[str] = typer.Option(..., "--host", help="Name or IP the sites use to reach the "
                                   "coordinator (repeatable)."),
    dir_: Path = CERTS_DIR_OPT,
    days: int = typer.Option(825, help="Validity in days."),
    force: bool = FORCE_OPT,
) -> None:
    """Issue the coordinator's TLS certificate (SANs: each --host, plus localhost/127.0.0.1)."""
    from fedtune.server.certs import CertError, describe_cert, issue_server_cert

    try:
        paths = issue_server_cert(dir_, host, days=days, force=force)
    except CertError as e:
        _fail(str(e))
    info = describe_cert(paths.server_cert)
    console.print(f"server certificate: {paths.server_cert}  (SAN: {', '.join(info['san'])})")
    console.print(f"server private key: {paths.server_key}  (mode 600)")


@certs_app.command("site")
def certs_site(
    site_id: str = typer.Argument(..., help="The site's id, e.g. hospital-a."),
    dir_: Path = CERTS_DIR_OPT,
    force: bool = FORCE_OPT,
) -> None:
    """Create a site's SuperNode key pair and register its public key with the coordinator."""
    from fedtune.server.certs import CertError, create_site_key

    try:
        paths = create_site_key(dir_, site_id, force=force)
    except CertError as e:
        _fail(str(e))
    console.print(f"site private key: {paths.site_key(site_id)}  (mode 600; copy to the site "
                  "only, as auth.private_key in its site.toml)")
    console.print(f"site public key:  {paths.site_pub(site_id)}")
    console.print(f"registered:       {paths.registered(site_id)}  (the coordinator admits "
                  "this site's SuperNode)")


@certs_app.command("register")
def certs_register(
    site_id: str = typer.Argument(..., help="The site's id."),
    public_key: Path = typer.Option(..., "--public-key", help="The site's site.pub."),
    dir_: Path = CERTS_DIR_OPT,
    force: bool = FORCE_OPT,
) -> None:
    """Register a public key that a site made itself (its private key never left the site)."""
    from fedtune.server.certs import CertError, register_site_key

    try:
        target = register_site_key(dir_, site_id, public_key, force=force)
    except CertError as e:
        _fail(str(e))
    console.print(f"registered: {target}")
