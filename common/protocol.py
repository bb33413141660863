"""The keys of fedtune's messages between the coordinator and the sites, written once.

A deployed run travels as a Flower app whose run config carries the effective fedtune
configuration (JSON) and the run's name; each SuperNode gets its site.toml path through its node
config. Both sides import these names from here, so they cannot drift apart.
"""

from __future__ import annotations

RUN_CONFIG_KEY = "fedtune-config"  # the effective RunConfig, as JSON
RUN_NAME_KEY = "fedtune-run-name"  # the run directory's name at the coordinator
RESUME_KEY = "fedtune-resume"  # true: continue the run after its last completed round
SITE_NODES_KEY = "fedtune-site-nodes"  # {node id: site name} of the registered sites, as JSON
NODE_CONFIG_KEY = "site-config"  # SuperNode node config: path of the site's site.toml
FITRES_PARAMETERS = "fitres.parameters"  # where Flower's legacy FitRes keeps the arrays

# The Flower app components that `flwr run` starts (installed fedtune modules).
SERVER_APP_COMPONENT = "fedtune.server.superlink_app:app"
CLIENT_APP_COMPONENT = "fedtune.client.supernode_app:app"

# A site that refuses a SecAgg+ setup (its policy, client/site_policy.py) fails that message;
# the error text carries this tag, its name and the reason, so the coordinator can list it.
SITE_REFUSAL_TAG = "fedtune-site-refusal"


def site_refusal_message(site_id: str, reason: str) -> str:
    return f"{SITE_REFUSAL_TAG} [{site_id}] {reason}"


def parse_site_refusal(text: str) -> tuple[str, str] | None:
    """(site_id, reason) from an error text made by `site_refusal_message`, else None."""
    _, tag, rest = text.partition(SITE_REFUSAL_TAG + " [")
    site_id, sep, reason = rest.partition("] ")
    if not tag or not sep:
        return None
    # Flower wraps the exception text: "<class '...'>:<'TEXT'>"
    return site_id, reason.removesuffix("'>").strip()
