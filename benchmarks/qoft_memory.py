"""Peak memory of one training step of a 4-bit (bitsandbytes nf4) Llama: QOFT (orthoft) vs PEFT OFT vs QLoRA.

Standalone: ``python benchmarks/qoft_memory.py [--device cpu|cuda] [--out benchmarks/results]``. Every
case runs in a fresh process on the same randomly initialised model (transformers' ``LlamaForCausalLM``
from a small config, its decoder linears replaced by ``bnb.nn.Linear4bit``), with the same targets
(all attention and MLP projections). A warm-up step creates the optimizer state; the next is measured,
as the other suites measure memory (``memory.py``): the live bytes of tensor storages, exactly, on CPU
and CUDA alike; "held" is what is live when the step starts, "step peak" what the step adds on top.

Writes a markdown table with device, versions, command and date to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cases import Step
from environment import device_name
from memory import measure_memory

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL = {
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "vocab_size": 4096,
}
BATCH, SEQ = 4, 256
CASES = {
    "qoft": "orthoft OFT (block size 32) on the 4-bit model",
    "peft-oft": "PEFT OFT (block size 32) on the 4-bit model",
    "peft-qlora": "PEFT LoRA (r 16) on the 4-bit model (QLoRA)",
}


def quantized_llama(device: torch.device) -> nn.Module:
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in TARGETS and type(child) is nn.Linear:
                quantized = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute_dtype,
                    quant_type="nf4",
                )
                quantized.load_state_dict(child.state_dict())
                setattr(parent, name, quantized)
    model.requires_grad_(False)
    return model.to(device)  # quantizes


def adapt(model: nn.Module, case: str) -> nn.Module:
    if case == "qoft":
        import orthoft

        return orthoft.get_orthoft_model(model, orthoft.OFTConfig(target_modules=TARGETS, oft_block_size=32))
    import peft

    if case == "peft-oft":
        config = peft.OFTConfig(target_modules=TARGETS, oft_block_size=32, r=0)
    else:
        config = peft.LoraConfig(target_modules=TARGETS, r=16, lora_alpha=32)
    return peft.get_peft_model(model, config)


def run_case(case: str, device: torch.device) -> dict[str, float | int | str]:
    facts: dict[str, Any] = {}

    def build() -> Step:
        model = adapt(quantized_llama(device), case)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        torch.manual_seed(1)
        ids = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ), device=device)

        def step(_: int) -> None:
            optimizer.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()

        facts["trainable"] = sum(p.numel() for p in trainable)
        facts["packed"] = sum(
            p.numel() * p.element_size()
            for name, p in model.named_parameters()
            if "weight" in name and p.dtype == torch.uint8
        )
        return step

    memory = measure_memory(build, device)
    return {
        "case": case,
        "step_peak_mib": memory.peak_bytes / 2**20,
        "held_mib": memory.held_bytes / 2**20,
        "trainable": facts["trainable"],
        "packed_4bit_mib": facts["packed"] / 2**20,
    }


def _versions() -> str:
    names = ["torch", "orthoft", "peft", "transformers", "bitsandbytes"]
    return ", ".join(f"{name} {version(name)}" for name in names)


def report(results: list[dict[str, float | int | str]], device: torch.device, command: str) -> str:
    model = ", ".join(f"{key}={value}" for key, value in MODEL.items())
    lines = [
        "# Peak memory of one training step of a 4-bit Llama: QOFT vs PEFT OFT vs QLoRA",
        "",
        f"- device: {device_name(device)} ({device.type}, {torch.get_num_threads()} threads)",
        f"- versions: {_versions()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `{command}`",
        f"- model: LlamaForCausalLM({model}), decoder projections in bitsandbytes nf4",
        f"- input: batch {BATCH} x {SEQ} tokens",
        "- targets: "
        + ", ".join(TARGETS)
        + "; AdamW; step = zero_grad, forward with loss, backward, optimizer step",
        "- memory: live tensor bytes (benchmarks/memory.py); held = live when the step starts, "
        "step peak = the step's live peak above that",
        "",
        "| case | step peak (MiB) | held (MiB) | trainable params | packed 4-bit weights (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for result in results:
        lines.append(
            f"| {CASES[str(result['case'])]} | {result['step_peak_mib']:.1f} "
            f"| {result['held_mib']:.1f} | {result['trainable']:,} "
            f"| {result['packed_4bit_mib']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)  # one case, in this process
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.case is not None:
        print(json.dumps(run_case(args.case, device)))
        return
    results = []
    for case in CASES:
        # A fresh process each: no case inherits another's allocations or caches.
        command = [sys.executable, __file__, "--device", args.device, "--case", case]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    text = report(results, device, shlex.join(["python", *sys.argv]))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    path = args.out / f"qoft-memory_{args.device}_{stamp}.md"
    path.write_text(text)
    print(text)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
