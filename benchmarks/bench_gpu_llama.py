"""GPU training speed: a ~1B-parameter Llama-shaped model, DP-LoRA vs LoRA in bf16, and QLoRA.

For the GPU figures of results/RESULTS.md: on an H100/H200, fedtune's real training loop
(client/trainer.py::train_local, Opacus DP-SGD with Poisson sampling, clipping and noise) on a
randomly initialised model of TinyLlama-1.1B's shape (22 layers, 2048 wide, 5632 FFN, 32 heads,
4 KV heads, 32,000 tokens; speed does not depend on the weights), bf16 base, LoRA r=16 on PEFT's
default Llama targets (q, v). Reported per variant: tokens/s (median of interleaved runs), the
counted model FLOPs per token (torch.utils.flop_counter, one forward+backward of fedtune's loss),
model-FLOPs utilisation = achieved FLOP/s / this device's bf16 matmul peak measured in the same
run, and peak device memory. With `--qlora` and bitsandbytes installed, the same two variants on
a 4-bit NF4 base (QLoRA, Dettmers et al., 2023, arXiv:2305.14314).

    python benchmarks/bench_gpu_llama.py --qlora                      # on the GPU machine
    python benchmarks/bench_gpu_llama.py --device cpu --tiny          # a quick check of the script

Examples are random token ids of `--seq` tokens whose second half is labelled (an instruction's
answer); all of the same length, so no padding is counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_train_speed import CountingDataset, flops_per_token, matmul_peak  # benchmarks/

from fedtune.client.trainer import train_local
from fedtune.common.config import LoraSettings, load_config
from fedtune.common.data import IGNORE_INDEX, EncodedDataset
from fedtune.common.lora import apply_lora

TINYLLAMA = {"num_hidden_layers": 22, "hidden_size": 2048, "intermediate_size": 5632,
             "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000}
TINY = {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 704,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 4096}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_examples(n: int, seq: int, vocab: int, seed: int) -> EncodedDataset:
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
        half = seq // 2
        items.append({"input_ids": ids, "labels": [IGNORE_INDEX] * half + ids[half:]})
    return EncodedDataset(items)


def build_model(shape: dict, dtype: torch.dtype, device: torch.device, qlora: bool,
                tmp: Path) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    if not qlora:
        base = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    else:
        from transformers import BitsAndBytesConfig

        # bitsandbytes quantizes while loading: write the random model once, load it in 4 bits.
        path = tmp / "llama-random"
        if not (path / "config.json").exists():
            LlamaForCausalLM(config).to(dtype).save_pretrained(path)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=dtype)
        base = LlamaForCausalLM.from_pretrained(path, quantization_config=quant,
                                                device_map={"": device.index or 0})
    base.requires_grad_(False)
    return apply_lora(base, "causal_lm", LoraSettings(r=16, alpha=32, init_seed=1))


def bench(label: str, model: torch.nn.Module, a: argparse.Namespace, device: torch.device,
          peak: float) -> dict:
    data = CountingDataset(random_examples(a.records, a.seq, model.config.vocab_size, seed=1))
    cfg = load_config(overrides=[f"train.batch_size={a.batch}", "train.lr=1e-4",
                                 f"train.chunk_tokens={a.chunk_tokens}"])

    def variant(dp_enabled: bool) -> Callable[[int], None]:
        dp = cfg.dp.model_copy(update={"enabled": dp_enabled})

        def run(seed: int) -> None:
            train_local(model, data, task="causal_lm", pad_id=0, device=device, train=cfg.train,
                        dp=dp, noise_multiplier=1.0, steps=a.steps, seed=seed)
            sync(device)
        return run

    variants = {"LoRA (non-DP)": variant(False), "DP-LoRA": variant(True)}
    fpt = flops_per_token(model, data.base, 0, "causal_lm", 1, device)
    rates: dict[str, list[float]] = {k: [] for k in variants}
    memory: dict[str, float] = {}
    for key, run in variants.items():  # warm-up: kernels, allocator, Opacus
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run(12345)
        if device.type == "cuda":
            memory[key] = torch.cuda.max_memory_allocated(device) / 2**30
    for rep in range(a.reps):
        for key, run in variants.items():
            data.reset()
            t = time.perf_counter()
            run(rep)
            rates[key].append(data.tokens / (time.perf_counter() - t))
    out = {"label": label, "flops_per_token": fpt, "runs": rates, "peak_memory_gib": memory,
           "tokens_per_s": {k: statistics.median(v) for k, v in rates.items()}}
    print(f"\n{label}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters "
          f"(as stored), {fpt / 1e9:.2f} GFLOP/token counted (fwd+bwd)")
    for key, tps in out["tokens_per_s"].items():
        mfu = tps * fpt / 1e9 / peak
        mem = f", peak memory {memory[key]:.1f} GiB" if key in memory else ""
        print(f"  {key:14s} {tps:10.1f} tokens/s  MFU {mfu:.3f}{mem}   runs: "
              + ", ".join(f"{x:.0f}" for x in rates[key]))
    paired = statistics.median(d / n for d, n in zip(rates["DP-LoRA"], rates["LoRA (non-DP)"],
                                                      strict=True))
    print(f"  DP / non-DP, median of run-by-run ratios: {paired:.3f} (target >= 0.95)")
    out["dp_over_non_dp_paired"] = paired
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model, to check the script")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--records", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--chunk-tokens", type=int, default=0,
                   help="train.chunk_tokens (0: the batch in one pass; examples have no padding)")
    p.add_argument("--qlora", action="store_true", help="also a 4-bit NF4 base (bitsandbytes)")
    p.add_argument("--tmp", default=tempfile.gettempdir() + "/fedtune-gpu-bench")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (use --device cpu --tiny to "
                         "check the script on a CPU)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = matmul_peak(None, 8192 if device.type == "cuda" else 1024, device=device,
                       dtype=dtype)
    print(f"device: {name}; {a.dtype} matmul peak {peak / 1e3:.1f} TFLOP/s (measured); "
          f"torch {torch.__version__}")
    shape = TINY if a.tiny else TINYLLAMA
    results = [bench(f"Llama-shaped ({a.dtype} base)", build_model(shape, dtype, device, False,
                                                                   Path(a.tmp)),
                     a, device, peak)]
    if a.qlora:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            print(f"\nQLoRA skipped: bitsandbytes cannot be imported here ({e})")
        else:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results.append(bench("QLoRA (4-bit NF4 base)",
                                 build_model(shape, dtype, device, True, Path(a.tmp)),
                                 a, device, peak))
    if a.json:
        Path(a.json).write_text(json.dumps({"device": name, "peak_gflops": peak,
                                            "results": results}, indent=1))


if __name__ == "__main__":
    main()
