"""The site's randomness for DP-SGD: Poisson sampling and Gaussian noise, secret by default.

Amplification by subsampling and the Gaussian mechanism both assume that nobody who sees the
update knows which records were sampled or which noise was drawn. The coordinator chooses the run
config (its `seed` included) and sees the site's id and round, so none of these may seed the
site's generators: by default they are filled from OS entropy at the site (`os.urandom`).

torch's CPU generator (MT19937) uses only the low 32 bits of `manual_seed`, so a 63-bit seed would
leave 2**32 candidate streams, few enough to try them all. A secret CPU generator therefore gets
its whole 624-word state from `os.urandom`; a CUDA generator (Philox) uses all 64 bits of its
seed. Neither is a cryptographic RNG (docs/privacy.md, "Randomness").

`dp.reproducible_seed = true` (simulations, benchmarks only) derives both from the run's seed, the
site and the round instead: whoever knows the seed can then recompute every batch and the noise.
"""

from __future__ import annotations

import os
import secrets
import struct
import zlib
from dataclasses import dataclass

import torch

from fedtune.common.config import DPConfig

# torch's CPU generator state: the legacy MT19937 record (seed u64, left i32, seeded i32,
# next u64, state u64[624], normal cache) then the float normal cache; 5,056 bytes.
_MT_STATE_OFFSET = 24
_MT_WORDS = 624
_CPU_STATE_BYTES = 5056


@dataclass(frozen=True)
class SiteRandomness:
    """The generators of one round's DP-SGD at a site, and whether they are secret."""

    sampler: torch.Generator  # CPU: the Poisson sampler (and the DataLoader) draw from it
    noise: torch.Generator  # on the training device: the Gaussian noise
    secret: bool


def coordinator_seed(run_seed: int, site_id: str, server_round: int) -> int:
    """The reproducible seed of a site's round: computable by anyone who knows the run config."""
    return zlib.crc32(f"{run_seed}:{site_id}:{server_round}".encode())


def round_seed(dp: DPConfig, run_seed: int, site_id: str, server_round: int) -> int | None:
    """The seed a site trains a round with: None (secret, OS entropy) unless the run explicitly
    asks for reproducible seeds (`dp.reproducible_seed`)."""
    return coordinator_seed(run_seed, site_id, server_round) if dp.reproducible_seed else None


def secret_cpu_generator() -> torch.Generator:
    """A CPU generator whose whole MT19937 state (19,968 bits) comes from os.urandom."""
    gen = torch.Generator().manual_seed(secrets.randbits(32))  # valid header: left=1, next=0
    state = bytearray(gen.get_state().numpy().tobytes())
    if len(state) != _CPU_STATE_BYTES:
        raise RuntimeError(f"unknown torch CPU generator state ({len(state)} bytes, expected "
                           f"{_CPU_STATE_BYTES}): cannot draw a secret generator state")
    words = struct.unpack(f"<{_MT_WORDS}I", os.urandom(4 * _MT_WORDS))
    struct.pack_into(f"<{_MT_WORDS}Q", state, _MT_STATE_OFFSET, *words)
    new = torch.frombuffer(state, dtype=torch.uint8).clone()
    gen.set_state(new)
    if not torch.equal(gen.get_state(), new):  # the layout is what this module assumes
        raise RuntimeError("torch rejected the secret generator state")
    return gen


def _device_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator on `device`: seeded, or secret when `seed` is None."""
    if device.type == "cpu":
        return secret_cpu_generator() if seed is None else torch.Generator().manual_seed(seed)
    # Philox on CUDA: manual_seed keeps all 64 bits.
    return torch.Generator(device=device).manual_seed(
        secrets.randbits(64) if seed is None else seed)


def site_randomness(seed: int | None, device: torch.device) -> SiteRandomness:
    """The sampler and noise generators of one round: from OS entropy when `seed` is None, else
    both derived from `seed` (reproducible, and known to whoever knows the seed)."""
    sampler = secret_cpu_generator() if seed is None else torch.Generator().manual_seed(seed)
    noise_seed = None if seed is None else zlib.crc32(f"{seed}:noise".encode())
    return SiteRandomness(sampler, _device_generator(device, noise_seed), secret=seed is None)
