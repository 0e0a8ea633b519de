"""Trains an orthoft adapter on a tiny Llama in one process of a group, wrapped in DistributedDataParallel
or FSDP2's ``fully_shard`` (gloo, CPU), and saves it; tests/test_trainers.py starts two of these and
compares with one process training on the whole batches.

Run: ``RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python distributed_train.py OUT``: trains with
each wrapper in turn (one start-up for all) and saves into ``OUT/ddp``, ``OUT/fsdp2`` and ``OUT/fsdp2_moe``
(FSDP2 on a mixture of experts adapted through its expert weights).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import LlamaForCausalLM, Qwen3MoeForCausalLM

from orthoft import BOFTConfig, OFTConfig, get_orthoft_model, save_adapter
from orthoft.config import OrthoftConfig

from tiny_models import tiny_llama_config
from tiny_moe import EXPERT_PARAMETERS, tiny_qwen3_moe_config

STEPS = 4
BATCH = 8
CONFIGS: dict[str, OrthoftConfig] = {
    "ddp": OFTConfig(target_modules=["q_proj", "v_proj", "down_proj"], oft_block_size=8),
    "fsdp2": BOFTConfig(
        target_modules=["q_proj", "v_proj", "down_proj"], boft_block_size=4, boft_n_butterfly_factor=2
    ),
    # A mixture of experts whose expert weights FSDP2 shards by expert, adapted through its parameters.
    "fsdp2_moe": BOFTConfig(
        target_modules=[], target_parameters=EXPERT_PARAMETERS, boft_block_size=4, boft_n_butterfly_factor=2
    ),
}


def build_model(mode: str) -> nn.Module:
    torch.manual_seed(0)
    if mode == "fsdp2_moe":
        return get_orthoft_model(Qwen3MoeForCausalLM(tiny_qwen3_moe_config()), CONFIGS[mode])
    return get_orthoft_model(LlamaForCausalLM(tiny_llama_config()), CONFIGS[mode])


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, 48, (BATCH, 12), generator=generator) for _ in range(STEPS)]


def train(model: nn.Module, rank: int = 0, world_size: int = 1) -> None:
    """Adam steps on this rank's equal share of each batch: the gradient averaged over ranks is the
    gradient of the whole batch's mean loss."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    share = BATCH // world_size
    for batch in batches():
        part = batch[rank * share : (rank + 1) * share]
        optimizer.zero_grad()
        model(input_ids=part, labels=part).loss.backward()
        optimizer.step()


def wrap(model: nn.Module, mode: str) -> nn.Module:
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    wrapped = fully_shard(model)
    if mode == "fsdp2_moe":
        # Each rank holds half of the experts of each expert weight (and of their rotations).
        experts = model.model.layers[0].mlp.experts.get_base_layer()
        assert experts.gate_up_proj.to_local().shape[0] == 4 // dist.get_world_size(), experts.gate_up_proj
    return wrapped


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    for mode in CONFIGS:
        model = build_model(mode)
        train(wrap(model, mode), rank, world_size)
        # FSDP2's shards are gathered inside save_adapter, so every rank calls it; one writes.
        save_adapter(model, out / mode, is_main_process=rank == 0)
    # Both ranks leave together: a rank that exits while its peer still tears down gloo's connections
    # can make the peer's background threads abort it.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
    sys.stdout.flush()
    # The work is saved; skip interpreter teardown, where native threads of imported libraries have
    # aborted a finished rank ("terminate called without an active exception").
    os._exit(0)
