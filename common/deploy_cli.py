"""Deployment commands of the `fedtune` CLI: `certs`, `server`, `client`, `demo-data`.

Registered on the main typer app by common/cli.py. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from common.config import ConfigError, load_config

console = Console()
err_console = Console(stderr=True)

certs_app = typer.Typer(
    help="Certificates and site keys: a CA, the coordinator's TLS certificate, site key pairs.",
    no_args_is_help=True,
)

CERTS_DIR_OPT = typer.Option(Path("certs"), "--dir", "-d", help="Certificate directory.")
FORCE_OPT = typer.Option(False, "--force", help="Replace existing files (never done silently).")

INSECURE_WARNING = (
    "[bold red]WARNING: --insecure: PLAINTEXT connections, no TLS, no site authentication.\n"
    "Adapter updates travel unencrypted and any process that can reach the port can join.\n"
    "Use this only on an isolated test network.[/bold red]"
)


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False)
    raise typer.Exit(code)


# ---------------------------------------------------------------------------------------------
# fedtune certs ...


@certs_app.command("init")
def certs_init(
    dir_: Path = CERTS_DIR_OPT,
    days: int = typer.Option(3650, help="Validity of the CA certificate in days."),
    force: bool = FORCE_OPT,
) -> None:
    """Create the consortium's certificate authority (ca.crt, ca/ca.key)."""
    from common.certs import CertError, init_ca

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
    from common.certs import CertError, describe_cert, issue_server_cert

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
    from common.certs import CertError, create_site_key

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
    from common.certs import CertError, register_site_key

    try:
        target = register_site_key(dir_, site_id, public_key, force=force)
    except CertError as e:
        _fail(str(e))
    console.print(f"registered: {target}")


# ---------------------------------------------------------------------------------------------
# fedtune server / client


def server(
    config: Path | None = typer.Option(None, "--config", "-c", help="Run configuration (TOML)."),
    set_: list[str] | None = typer.Option(None, "--set", "-s", help="Override a key "
                                          "(repeatable), e.g. --set federation.rounds=5"),
    certs: Path = typer.Option(Path("certs"), "--certs", help="Certificate directory "
                               "(`fedtune certs`)."),
    state_dir: Path = typer.Option(Path("coordinator-state"), "--state-dir",
                                   help="SuperLink database, Flower home, logs."),
    fleet_address: str = typer.Option("0.0.0.0:9092", "--fleet-address",
                                      help="Where the sites connect (gRPC, TLS)."),
    control_port: int = typer.Option(8000, "--control-port",
                                     help="SuperLink Control/Runtime API port (127.0.0.1)."),
    timeout: float = typer.Option(0, "--timeout", help="Stop the run after this many seconds "
                                  "(0: no limit)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plaintext, no site "
                                  "authentication. Test networks only."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run "
                                "(output.run_name, default: the latest) after its last "
                                "completed round."),
) -> None:
    """Start the coordinator: a Flower SuperLink (TLS, site authentication) and the run."""
    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as e:
        _fail(str(e))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from common.data import DataError
    from server.coordinator import (
        Coordinator,
        CoordinatorError,
        CoordinatorOptions,
        prepare_deployment,
    )

    if insecure:
        err_console.print(INSECURE_WARNING)
    opts = CoordinatorOptions(
        certs_dir=certs, state_dir=state_dir.resolve(), fleet_address=fleet_address,
        control_port=control_port, insecure=insecure, run_timeout_s=timeout,
    )
    coord = Coordinator(opts, say=console.print)
    try:
        keys = coord.check()
        prepared = prepare_deployment(cfg, resume=resume)
    except (CoordinatorError, ConfigError, DataError, FileExistsError, ValueError) as e:
        _fail(str(e))
    c = prepared.cfg
    console.rule(f"fedtune server — {prepared.run_name}")
    console.print(
        f"model [bold]{c.model.name}[/bold] | {c.federation.num_sites} sites | "
        f"{c.federation.rounds} rounds x {c.train.local_steps} local steps | "
        f"DP {'on' if c.dp.enabled else 'off'} | "
        f"secure aggregation {'on (SecAgg+)' if c.federation.secagg else 'OFF'} | "
        f"TLS {'OFF' if insecure else 'on'}"
    )
    console.print(f"run directory: {prepared.run_dir}")
    if c.federation.round_timeout_s is None:
        # A hung site (or one restarted under the same node id) is otherwise waited for until
        # Flower's message TTL, 12 h (docs/reliability.md).
        err_console.print("[yellow]federation.round_timeout_s is not set: a site that hangs "
                          "can stall a round for up to 12 h. Set it to a few times the slowest "
                          "site's training time.[/yellow]")
    if prepared.resume:
        done = prepared.resumed_after
        console.print(f"resuming run {prepared.run_name}: " + (
            f"rounds 1..{done} completed, continuing at round {done + 1}" if done
            else "no round completed yet, starting at round 1"))
        if done is not None and done >= c.federation.rounds:
            console.print(f"all {c.federation.rounds} rounds are complete; nothing to do")
            console.print(f"final adapter: {prepared.run_dir / 'adapter'}")
            return

    import signal

    def _term(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    status = "not started"
    try:
        coord.start_superlink()
        console.print(f"SuperLink: Fleet API {fleet_address} (gRPC{'' if insecure else ', TLS'}"
                      f"{'' if insecure else ', SuperNode authentication'}), "
                      f"Control API {opts.control_address}; log {opts.log_path}")
        for site_id, what in coord.register_sites(keys).items():
            console.print(f"site key {site_id}: {what}")
        coord.wait_for_stale_nodes()  # after a restart: sites listed online from before it
        run_id = coord.submit(prepared)
        console.print(f"Flower run {run_id} submitted; waiting for "
                      f"{c.federation.num_sites} sites")

        def on_round(rec: dict) -> None:
            sites = rec.get("sites") or []
            eps = [f"{s.get('site_id')}: ε={s['epsilon']:.3g}" for s in sites if "epsilon" in s]
            ev = rec.get("eval", {})
            main = ", ".join(f"{k}={v:.4g}" for k, v in ev.items()
                             if isinstance(v, (int, float)))
            console.print(f"round {rec['round']}: {main}" + (f" | {'; '.join(eps)}"
                                                             if eps else ""))

        status = coord.follow(run_id, prepared, on_round)
        if (log := coord.save_run_log(run_id, prepared)) is not None:
            console.print(f"ServerApp log: {log}")
    except KeyboardInterrupt:
        err_console.print("interrupted: stopping the SuperLink")
        status = "interrupted"
    except CoordinatorError as e:
        coord.stop()
        _fail(str(e), 1)
    finally:
        coord.stop()
    console.print(f"run status: {status}")
    adapter = prepared.run_dir / "adapter"
    if status != "finished:completed" or not (adapter / "adapter_config.json").exists():
        _fail(f"the run did not complete ({status}); see {opts.log_path} and "
              f"{prepared.run_dir}", 1)
    console.print(f"final adapter: {adapter}")


def client(
    config: Path = typer.Option(..., "--config", "-c", help="The site's site.toml."),
    insecure: bool = typer.Option(False, "--insecure", help="Plaintext, no authentication. "
                                  "Test networks only."),
    max_restarts: int | None = typer.Option(None, "--max-restarts", help="Exit after this "
                                            "many failed connections (default: retry forever)."),
    check: bool = typer.Option(False, "--check", help="Only validate the configuration."),
) -> None:
    """Start this site's daemon: a Flower SuperNode that trains on the site's private data."""
    from common.site_config import load_site_config

    try:
        cfg = load_site_config(config, insecure=insecure)
    except ConfigError as e:
        _fail(str(e))
    if check:
        from client.preflight import preflight

        problems = preflight(cfg)
        if problems:
            _fail(f"{config}: site {cfg.site_id} is not ready:\n"
                  + "\n".join(f"  {p}" for p in problems))
        console.print(f"{config}: OK (site {cfg.site_id})")
        return
    if insecure:
        err_console.print(INSECURE_WARNING)
    from client.daemon import SiteDaemon

    raise typer.Exit(SiteDaemon(cfg, config, insecure=insecure, max_restarts=max_restarts).run())


def write_demo_data(cfg, out: Path) -> list[Path]:
    """Split fedtune's demo data as `fedtune simulate` would: out/site-K/train.jsonl per site
    (federation.num_sites of them) and out/eval.jsonl (the coordinator's held-out split)."""
    import shutil

    from simulations.runner import prepare_run

    out = Path(out)
    cfg = cfg.model_copy(update={
        "output": cfg.output.model_copy(update={"dir": out, "run_name": ".demo-split"}),
        # this makes the evaluation file: a data.eval of the run (the coordinator's) is not read
        "data": cfg.data.model_copy(update={"train": "demo", "eval": None}),
    })
    prepared = prepare_run(cfg)
    written = []
    try:
        for spec in prepared.sites:
            target = out / spec.site_id / "train.jsonl"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(spec.data_path, target)
            written.append(target)
        shutil.copyfile(prepared.eval_path, out / "eval.jsonl")
    finally:
        shutil.rmtree(prepared.run_dir, ignore_errors=True)
    return [*written, out / "eval.jsonl"]


def demo_data(
    out: Path = typer.Option(Path("demo-data"), "--out", "-o", help="Output directory."),
    sites: int = typer.Option(3, "--sites", help="Number of sites."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Run configuration (TOML): "
                                       "model/task decide the kind of demo data."),
    set_: list[str] | None = typer.Option(None, "--set", "-s", help="Override a key."),
) -> None:
    """Write demo data for a deployment: site-K/train.jsonl per site, and eval.jsonl."""
    try:
        cfg = load_config(config, [*(set_ or []), f"federation.num_sites={sites}"])
        files = write_demo_data(cfg, out)
    except (ConfigError, ValueError, FileExistsError) as e:
        _fail(str(e))
    for f in files:
        console.print(f"wrote {f}  ({sum(1 for _ in open(f, encoding='utf-8'))} records)")


def register(app: typer.Typer) -> None:
    app.add_typer(certs_app, name="certs")
    app.command("server")(server)
    app.command("client")(client)
    app.command("demo-data")(demo_data)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the `fedtune` command")
