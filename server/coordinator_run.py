"""One deployed run, start to end: what `fedtune server` does between its header and its exit.

Prepare the run directory (or reopen it with `--resume`), register the site keys and start the
SuperLink (keys first, so no site can reach the Fleet API before its key is known), wait out
SuperNodes left over from before a restart, submit the Flower app, follow the rounds, keep the
ServerApp's log, stop the SuperLink. SIGTERM (systemd, Kubernetes) stops the
run like Ctrl-C, so the SuperLink never outlives the coordinator.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from fedtune.common.config import RunConfig
from fedtune.server.coordinator import Coordinator, CoordinatorOptions
from fedtune.server.deployment_run import PreparedDeployment, prepare_deployment
from fedtune.server.participation import describe_participation
from fedtune.server.run_log import HandshakeWatch
from fedtune.server.status_file import StatusFile, control_nodes
from fedtune.server.tracking import check_tracking

Say = Callable[[str], None]
ALREADY_COMPLETE = "finished:completed (before this start)"


def open_run(cfg: RunConfig, opts: CoordinatorOptions, *, resume: bool,
             say: Say) -> tuple[Coordinator, dict[str, Path], PreparedDeployment]:
    """Check the certificates and site keys, then prepare (or reopen) the run directory."""
    check_tracking(cfg)  # a [tracking] key on without its library: refused at the start
    coord = Coordinator(opts, say=say)
    keys = coord.check()
    return coord, keys, prepare_deployment(cfg, resume=resume)


def describe_round(rec: dict) -> str:
    """One console line per round: held-out metrics, then each site's epsilon (or, for a site
    that refused or declined, its status and reason), then the sites that dropped out of it."""
    sites = rec.get("sites") or []
    eps = [f"{s.get('site_id')}: {s['status']} ({s.get('reason', '')})"
           if s.get("status") not in (None, "ok")
           else f"{s.get('site_id')}: ε={s['epsilon']:.3g}" for s in sites
           if "epsilon" in s or s.get("status") not in (None, "ok")]
    ev = rec.get("eval", {})
    main = ", ".join(f"{k}={v:.4g}" for k, v in ev.items() if isinstance(v, (int, float)))
    dropped = (rec.get("participation") or {}).get("dropped") or {}
    gone = describe_participation({"dropped": dropped})  # declines/refusals: in `eps` above
    return (f"round {rec['round']}: {main}" + (f" | {'; '.join(eps)}" if eps else "")
            + (f" | {gone}" if gone else ""))


def serve(coord: Coordinator, keys: dict[str, Path], prepared: PreparedDeployment, *,
          say: Say, warn: Say) -> str:
    """Run the federation; returns Flower's final run status ("finished:completed" when done).

    Raises CoordinatorError when the SuperLink cannot start or the run fails."""
    c = prepared.cfg
    if prepared.resume:
        done = prepared.resumed_after
        say(f"resuming run {prepared.run_name}: " + (
            f"rounds 1..{done} completed, continuing at round {done + 1}" if done
            else "no round completed yet, starting at round 1"))
        if done is not None and done >= c.federation.rounds:
            say(f"all {c.federation.rounds} rounds are complete; nothing to do")
            return ALREADY_COMPLETE

    def _term(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    opts = coord.opts
    status = "not started"
    # <run_dir>/status.json for `fedtune status`: sites connected, last round, what it waits for
    live = StatusFile(prepared.run_dir, prepared.run_name, c, sorted(keys),
                      nodes=lambda: control_nodes(coord))
    live.update(state="starting")
    # A plaintext site is refused inside gRPC: said in words from the SuperLink's log
    tls_watch = None if opts.insecure else HandshakeWatch(opts.log_path, warn, opts.fleet_address)
    try:
        # The keys are registered before the Fleet API opens: a site started before the
        # coordinator is never refused for a key registered a moment too late.
        registered = coord.start_registered(keys)
        for site_id, what in registered.items():
            say(f"site key {site_id}: {what}")
        tls = "" if opts.insecure else ", TLS, SuperNode authentication"
        say(f"SuperLink: Fleet API {opts.fleet_address} (gRPC{tls}), "
            f"Control API {opts.control_address}; log {opts.log_path}"
            + (f"; site keys registered before the Fleet API opened "
               f"({coord.registration_s:.1f} s)" if registered else ""))
        if prepared.resume:  # what the previous start logged after its last copy
            coord.catch_up_run_log(prepared)
        coord.wait_for_stale_nodes()  # after a restart: sites listed online from before it
        run_id = coord.submit(prepared)
        live.submitted(run_id)
        say(f"Flower run {run_id} submitted; waiting for {c.federation.num_sites} sites")

        def on_round(rec: dict) -> None:
            say(describe_round(rec))
            coord.save_run_log(run_id, prepared, final=False)  # server.log up to this round

        def on_poll(flower_status: str) -> None:
            live.update(flower_status)
            if tls_watch is not None:
                tls_watch.poll()

        status = coord.follow(run_id, prepared, on_round, on_poll=on_poll)
        if (log := coord.save_run_log(run_id, prepared)) is not None:
            say(f"ServerApp log: {log}")
    except KeyboardInterrupt:
        warn("interrupted: stopping the SuperLink")
        status = "interrupted"
    finally:
        live.close(status)
        coord.stop()
    return status
