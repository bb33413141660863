"""fedtune: federated, differentially private LoRA fine-tuning of language models.

The installed package is one namespace. Its subpackages live in the repository's top-level
folders (pyproject.toml maps them): `fedtune.common` (common/), `fedtune.client` (client/),
`fedtune.server` (server/), `fedtune.report` (report/), `fedtune.simulations` (simulations/)
and `fedtune.cli` (cli/). docs/architecture.md describes the layers.
"""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """`fedtune.load(run_dir)` (common/loading.py), imported on first use: importing fedtune
    stays cheap (no torch)."""
    if name in ("load", "LoadedRun"):
        from fedtune.common import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'fedtune' has no attribute {name!r}")
