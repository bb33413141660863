"""fedtune: federated, differentially private LoRA fine-tuning of language models.

The installed package is one namespace. Its subpackages live in the repository's top-level
folders (pyproject.toml maps them): `fedtune.common` (common/), `fedtune.client` (client/),
`fedtune.server` (server/), `fedtune.report` (report/), `fedtune.simulations` (simulations/)
and `fedtune.cli` (cli/). docs/architecture.md describes the layers.
"""

__version__ = "0.1.0"
