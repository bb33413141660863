"""Deployment commands of the `fedtune` CLI: `server`, `client`, `demo-data`.

Registered on the main typer app by cli/main.py. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from fedtune.cli.console import console, err_console
from fedtune.cli.console import fail as _fail
from fedtune.common.config import ConfigError, load_config

INSECURE_WARNING = (
    "[bold red]WARNING: --insecure: PLAINTEXT connections, no TLS, no site authentication.\n"
    "Adapter updates travel unencrypted and any process that can reach the port can join.\n"
    "Use this only on an isolated test network.[/bold red]"
)


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
    from fedtune.common.data import DataError
    from fedtune.common.run_layout import RunLayout
    from fedtune.server.coordinator import CoordinatorError, CoordinatorOptions
    from fedtune.server.coordinator_run import open_run, serve

    if insecure:
        err_console.print(INSECURE_WARNING)
    opts = CoordinatorOptions(
        certs_dir=certs, state_dir=state_dir.resolve(), fleet_address=fleet_address,
        control_port=control_port, insecure=insecure, run_timeout_s=timeout,
    )
    try:
        coord, keys, prepared = open_run(cfg, opts, resume=resume, say=console.print)
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
    try:
        status = serve(coord, keys, prepared, say=console.print, warn=err_console.print)
    except CoordinatorError as e:
        _fail(str(e), 1)
    from fedtune.common.round_record import read_rounds
    from fedtune.server.outcome import training_failure

    if status.startswith("finished:completed"):
        # Every round finished, but did any site train? (None: all refused, declined or failed.)
        failure = training_failure(read_rounds(prepared.run_dir), c.federation.min_fit_sites,
                                   sorted(keys))
        if failure:
            console.print(f"run status: {status}")
            _fail(f"{failure}\nsee {prepared.run_dir / 'metrics.jsonl'}, "
                  f"{prepared.run_dir / 'server.log'} and {opts.log_path}", 1)
    adapter = RunLayout(prepared.run_dir).adapter
    complete = (adapter / "adapter_config.json").exists()
    if not status.startswith("finished:completed") or not complete:
        console.print(f"run status: {status}")
        _fail(f"the run did not complete ({status}); see {opts.log_path} and "
              f"{prepared.run_dir}", 1)
    if status == "finished:completed":
        console.print(f"run status: {status}")
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
    from fedtune.client.site_config import load_site_config

    try:
        cfg = load_site_config(config, insecure=insecure)
    except ConfigError as e:
        _fail(str(e))
    if check:
        from fedtune.client.preflight import policy_summary, preflight

        problems = preflight(cfg)
        if problems:
            _fail(f"{config}: site {cfg.site_id} is not ready:\n"
                  + "\n".join(f"  {p}" for p in problems))
        console.print(f"{config}: OK (site {cfg.site_id})")
        console.print("privacy policy (site.toml [privacy]):\n"
                      + "\n".join(f"  {line}" for line in policy_summary(cfg)),
                      highlight=False, markup=False)
        return
    if insecure:
        err_console.print(INSECURE_WARNING)
    from fedtune.client.daemon import SiteDaemon

    raise typer.Exit(SiteDaemon(cfg, config, insecure=insecure, max_restarts=max_restarts).run())


def write_demo_data(cfg, out: Path) -> list[Path]:
    """Split fedtune's demo data as `fedtune simulate` would: out/site-K/train.jsonl per site
    (federation.num_sites of them) and out/eval.jsonl (the coordinator's held-out split)."""
    import shutil

    from fedtune.simulations.runner import prepare_run

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
    app.command("server")(server)
    app.command("client")(client)
    app.command("demo-data")(demo_data)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the `fedtune` command")
