"""Export to LoRA: orthoft's and PEFT's converters on the same OFT adapter, time and error.

Standalone: ``python benchmarks/lora_export.py [--device cpu|cuda] [--out benchmarks/runs] [--quick]``.
The model is transformers' ``LlamaForCausalLM`` from a config (2 layers, hidden 1024, MLP 2816) with OFT
(block size 32) on all 14 linear layers, its adapter tensors drawn at random (as after training: a
rotation far from the identity). orthoft exports it; PEFT's ``peft.tuners.lora.conversion.convert_to_lora``
exports the same adapter, saved by ``orthoft.save_adapter`` and loaded by ``PeftModel.from_pretrained``.
Each rank (16, 64 and full: the layers' ``min(out, in)``, here 1024) is timed in interleaved rounds,
best of the rounds reported; each layer's error is ``||delta - B A|| / ||delta||`` against orthoft's
merged delta (``get_delta_weight``), for both exports alike, and the table gives the largest per-layer
ratio of an exporter's error to PEFT's (less 1; at full rank both are float rounding).

Writes a markdown table with device, versions, command and date to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn

from environment import device_name

MODEL = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 2,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 256,
}
QUICK_MODEL = {
    **MODEL,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOCK_SIZE = 32


def adapted_llama(fields: dict[str, int], device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The orthoft model and PEFT's OFT model with the same adapter tensors."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    import orthoft

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    model = orthoft.get_orthoft_model(
        copy.deepcopy(base), orthoft.OFTConfig(target_modules=TARGETS, oft_block_size=BLOCK_SIZE)
    )
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.05)
    with tempfile.TemporaryDirectory() as directory:
        orthoft.save_adapter(model, directory)
        peft_model = peft.PeftModel.from_pretrained(base, directory)
    return model.to(device), peft_model.to(device)


def relative_errors(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[float]:
    from orthoft.tuner import named_orthoft_layers

    errors = []
    with torch.no_grad():
        for path, layer in named_orthoft_layers(model):
            delta = layer.get_delta_weight().float()
            a = state_dict[f"base_model.model.{path}.lora_A.weight"].float()
            b = state_dict[f"base_model.model.{path}.lora_B.weight"].float()
            errors.append(float((delta - b @ a).norm() / delta.norm()))
    return errors


def timed(
    run: Callable[[], dict[str, torch.Tensor]], device: torch.device
) -> tuple[float, dict[str, torch.Tensor]]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    state_dict = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, state_dict


def measure(quick: bool, device: torch.device, rounds: int) -> list[dict[str, object]]:
    from peft.tuners.lora.conversion import convert_to_lora as peft_convert_to_lora

    import orthoft

    fields = QUICK_MODEL if quick else MODEL
    model, peft_model = adapted_llama(fields, device)
    full = fields["hidden_size"]
    exporters: dict[str, Callable[[int], dict[str, torch.Tensor]]] = {
        "orthoft": lambda rank: orthoft.convert_to_lora(model, rank, progressbar=False).state_dict,
        "orthoft (exact SVD)": lambda rank: (
            orthoft.convert_to_lora(model, rank, svd="exact", progressbar=False).state_dict
        ),
        "PEFT": lambda rank: peft_convert_to_lora(peft_model, rank)[1],
    }
    results = []
    for rank in (16, 64, full):
        names = [name for name in exporters if rank != full or name != "orthoft (exact SVD)"]
        best = dict.fromkeys(names, float("inf"))
        exported: dict[str, dict[str, torch.Tensor]] = {}
        for _ in range(rounds):  # interleaved: a busy moment of the machine hits every exporter alike
            for name in names:
                seconds, exported[name] = timed(lambda name=name, rank=rank: exporters[name](rank), device)
                best[name] = min(best[name], seconds)
        errors = {name: relative_errors(model, exported[name]) for name in names}
        for name in names:
            # Per layer, this exporter's error over PEFT's, less 1: the largest excess (or smallest deficit).
            excess = max(
                ours / peft - 1 if peft else (0.0 if ours == 0 else float("inf"))
                for ours, peft in zip(errors[name], errors["PEFT"], strict=True)
            )
            results.append(
                {
                    "rank": "full" if rank == full else rank,
                    "exporter": name,
                    "seconds": best[name],
                    "speedup": best["PEFT"] / best[name],
                    "mean_error": sum(errors[name]) / len(errors[name]),
                    "max_error": max(errors[name]),
                    "excess": excess,
                }
            )
            print(results[-1], flush=True)
    return results


def _versions() -> str:
    import orthoft

    names = ["torch", "peft", "transformers"]
    return ", ".join([f"orthoft {orthoft.__version__}", *(f"{name} {version(name)}" for name in names)])


def report(
    results: list[dict[str, object]], device: torch.device, command: str, quick: bool, rounds: int
) -> str:
    fields = QUICK_MODEL if quick else MODEL
    model = ", ".join(f"{key}={value}" for key, value in fields.items())
    lines = [
        "# Export to LoRA: orthoft's convert_to_lora vs PEFT's, same OFT adapter",
        "",
        f"- device: {device_name(device)} ({device.type}, {torch.get_num_threads()} threads)",
        f"- versions: {_versions()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `{command}`",
        f"- model: LlamaForCausalLM({model}), OFT block size {BLOCK_SIZE} on {', '.join(TARGETS)}",
        f"- time: best of {rounds} interleaved rounds of the whole export; error: per layer, "
        "||delta - B A||_F / ||delta||_F against orthoft's merged delta",
        "",
        "| rank | exporter | time (s) | faster than PEFT | mean relative error | max relative error "
        "| max over layers of error / PEFT's error - 1 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        lines.append(
            f"| {result['rank']} | {result['exporter']} | {result['seconds']:.3f} | {result['speedup']:.2f}x "
            f"| {result['mean_error']:.4e} | {result['max_error']:.4e} | {result['excess']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "runs")
    parser.add_argument("--quick", action="store_true", help="a hidden-128 model, one round: seconds")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 3, --quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        # On a shared machine one thread gives stable times: spinning OpenMP threads of other processes
        # make multi-threaded LAPACK calls vary by 10x from one call to the next.
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rounds = args.rounds or (1 if args.quick else 3)
    results = measure(args.quick, device, rounds)
    text = report(results, device, shlex.join(["python", *sys.argv]), args.quick, rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    path = args.out / f"lora-export_{args.device}{'_quick' if args.quick else ''}_{stamp}.md"
    path.write_text(text)
    print(text)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
