"""Training orthoft adapters with what people train with: transformers' Trainer, and
DistributedDataParallel and FSDP2 (two CPU processes, gloo) against one process on the whole batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from distributed_train import build_model, train
from orthoft.adapter_io import adapter_state_dict

from peft_interop import one_thread  # noqa: F401 (a fixture, used by name)

pytestmark = pytest.mark.usefixtures("one_thread")

WORKER = Path(__file__).with_name("distributed_train.py")
# Each process imports torch and transformers (a few seconds); the training itself takes well under one.
# The bound is generous: the two processes share the cores with whatever else the machine runs.
TIMEOUT_S = 300


class Tokens(Dataset):
    """Random token sequences; the causal LM loss is the labels' own."""

    def __init__(self, n: int) -> None:
        self.ids = torch.randint(0, 48, (n, 12), generator=torch.Generator().manual_seed(5))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def test_trainer_trains_only_the_adapter(tmp_path: Path) -> None:
    model = build_model("ddp")
    before = {name: value.clone() for name, value in model.state_dict().items()}
    adapter = {name for name, p in model.named_parameters() if p.requires_grad}
    assert adapter and all(".oft_R." in name for name in adapter)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=0.02,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(16))
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12
    # Four passes over the same 16 sequences: the last pass's loss is below the first's.
    assert sum(losses[-4:]) < sum(losses[:4]) - 0.05
    changed = {name for name, value in model.state_dict().items() if not torch.equal(value, before[name])}
    assert changed == adapter


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_processes(out: Path) -> None:
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env["PYTHONPATH"] = os.pathsep.join([str(WORKER.parent), env.get("PYTHONPATH", "")])
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out)],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for rank, (process, output) in enumerate(zip(processes, outputs, strict=False)):
        assert process.returncode == 0, f"rank {rank} failed:\n{output[-4000:]}"


@pytest.fixture(scope="module")
def trained_by_two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    run_two_processes(out)
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "fsdp2_moe"])
def test_two_processes_train_what_one_trains_on_the_whole_batch(trained_by_two: Path, mode: str) -> None:
    distributed = load_file(trained_by_two / mode / "adapter_model.safetensors")

    model = build_model(mode)
    initial = {key: value.detach().clone() for key, value in adapter_state_dict(model).items()}
    train(model)
    expected = adapter_state_dict(model)
    assert set(distributed) == set(expected)
    for key, value in expected.items():
        assert (value - initial[key]).abs().max() > 1e-3, key
        torch.testing.assert_close(distributed[key], value.detach(), rtol=0, atol=1e-5)
