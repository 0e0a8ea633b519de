"""How orthogonal the used rotations are: the report, the check during training, the conversion between
the series and the exact Cayley transform, and the Trainer callback."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

import orthoft
from orthoft import OrthogonalityError, OrthogonalityWarning
from orthoft.layers.series_check import orthogonality_check

from tiny_models import tiny_llama


def series_bound(q: float, terms: int = 5) -> float:
    """||series - (I + Q)(I - Q)^-1||_2 for ||Q||_2 = q < 1: the remainder ``Q^k + 2 sum_{j > k} Q^j``."""
    return q ** (terms - 1) + 2 * q**terms / (1 - q)


def oft_linear(scale: float, dtype: torch.dtype = torch.float64, device: str = "cpu", **options) -> nn.Module:
    layer = orthoft.OFTLinear(16, 8, block_size=4, dtype=dtype, device=device, **options)
    with torch.no_grad():
        layer.oft_R["default"].weight.normal_(0, scale)
    return layer


def q_norm(layer: nn.Module) -> float:
    return float(torch.linalg.matrix_norm(orthoft.reference.block_diag(skews(layer)), ord=2))


def skews(layer: nn.Module) -> torch.Tensor:
    """The layer's skew blocks, built by hand from its packed weight."""
    weight = layer.oft_R["default"].weight.detach()
    b = 4
    blocks = torch.zeros(weight.shape[0], b, b, dtype=weight.dtype, device=weight.device)
    rows, cols = torch.triu_indices(b, b, 1)
    blocks[:, rows, cols] = weight
    return blocks - blocks.mT


@pytest.mark.parametrize("q", [0.1, 0.5, 0.9])
def test_report_of_one_block_is_the_series_known_error(q: float) -> None:
    layer = orthoft.OFTLinear(2, 2, block_size=2, dtype=torch.float64)
    with torch.no_grad():
        layer.oft_R["default"].weight.fill_(q)
    (row,) = orthoft.orthogonality_report(layer).rows
    # Q has eigenvalues +-iq; the 5-term series has singular values |1 - q^4|, so ||R^T R - I|| = 2q^4 - q^8.
    assert row.q_norm == pytest.approx(q, rel=1e-12)
    assert row.error == pytest.approx(2 * q**4 - q**8, rel=1e-9)
    assert (row.method, row.form, row.blocks) == ("OFT", "series, 5 terms", 1)


def test_report_measures_the_rotation_the_layer_uses_worst_first() -> None:
    model = nn.Sequential(oft_linear(0.05), oft_linear(0.4), oft_linear(0.4, use_cayley_neumann=False))
    boft = orthoft.BOFTLinear(
        16, 16, block_size=4, n_butterfly_factor=2, init_weights=False, dtype=torch.float64
    )
    model.append(boft)
    report = orthoft.orthogonality_report(model)
    assert [row.layer for row in report.rows][:2] == ["1", "0"]
    assert report.worst is report.rows[0]
    assert [row.error for row in report.rows] == sorted((row.error for row in report.rows), reverse=True)
    rows = {row.layer: row for row in report.rows}
    for name in ("0", "1", "2"):
        rotation = model[int(name)].get_rotation().detach()
        dense_error = torch.linalg.matrix_norm(
            rotation.mT @ rotation - torch.eye(16, dtype=torch.float64), ord=2
        )
        assert rows[name].error == pytest.approx(float(dense_error), rel=1e-6, abs=1e-13)
        assert rows[name].q_norm == pytest.approx(q_norm(model[int(name)]), rel=1e-9)
    assert rows["2"].form == "exact" and rows["2"].error < 1e-13
    assert rows["3"].method == "BOFT" and rows["3"].blocks == 8 and rows["3"].error < 1e-13
    table = str(report)
    lines = table.splitlines()
    assert lines[0].split() == [
        "layer",
        "adapter",
        "method",
        "form",
        "blocks",
        "||Q||_2",
        "||R^T",
        "R",
        "-",
        "I||_2",
    ]
    assert lines[2].startswith("1 ") and f"{rows['1'].error:.3e}" in lines[2]


def test_report_changes_nothing_and_skips_unloaded_adapters() -> None:
    model = orthoft.get_orthoft_model(
        tiny_llama(), orthoft.OFTConfig(target_modules=["q_proj"], oft_block_size=8, coft=True, eps=1e-3)
    )
    orthoft.get_orthoft_model(
        model, orthoft.OFTConfig(target_modules=["v_proj"]), "later", low_cpu_mem_usage=True
    )
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.oft_R["default"].weight.normal_(0, 1.0)
    before = {key: value.clone() for key, value in model.state_dict().items() if not value.is_meta}
    report = orthoft.orthogonality_report(model)
    assert {row.adapter for row in report.rows} == {"default"} and len(report.rows) == 2
    # COFT: the rotation used is that of the projected blocks, which stay close to the identity.
    assert report.worst.q_norm < 1e-2
    after = model.state_dict()
    assert all(torch.equal(after[key], value) for key, value in before.items())


def training_forwards(layer: nn.Module, count: int) -> None:
    x = torch.randn(3, layer.in_features, dtype=layer.weight.dtype, device=layer.weight.device)
    layer.train()
    for _ in range(count):
        layer(x).sum().backward()


def test_healthy_adapters_train_without_a_warning() -> None:
    model = orthoft.get_orthoft_model(tiny_llama(), orthoft.OFTConfig(target_modules=["q_proj", "v_proj"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 48, (2, 12))
    with orthogonality_check(every=1), warnings.catch_warnings():
        warnings.simplefilter("error", OrthogonalityWarning)
        for _ in range(5):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    # Measured at every forward here; well below the threshold (0.01) after a few steps of usual size.
    assert 0 < orthoft.orthogonality_report(model).worst.error < 1e-3


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_a_diverging_series_warns_once_per_layer_naming_what_to_do(device: str) -> None:
    layer = oft_linear(0.4, dtype=torch.float32, device=device, layer_name="model.q_proj")
    expected = orthoft.orthogonality_report(layer).worst
    with pytest.warns(OrthogonalityWarning) as record:
        training_forwards(layer, 3)
    assert len(record) == 1
    message = str(record[0].message)
    assert "OFTLinear 'model.q_proj', adapter 'default'" in message
    assert (
        f"||Q||_2 = {expected.q_norm:.3g}" in message and f"||R^T R - I||_2 = {expected.error:.3g}" in message
    )
    assert "use_cayley_neumann=False" in message and "coft=True" in message and "learning rate" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error", OrthogonalityWarning)
        training_forwards(layer, 200)


def test_the_check_runs_on_the_first_forward_then_every_n() -> None:
    layer = oft_linear(0.0, dtype=torch.float32)
    with orthogonality_check(every=10), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        training_forwards(layer, 1)
        with torch.no_grad():
            layer.oft_R["default"].weight.normal_(0, 0.4)
        training_forwards(layer, 9)
        assert not [w for w in record if w.category is OrthogonalityWarning]
        training_forwards(layer, 1)
        assert len([w for w in record if w.category is OrthogonalityWarning]) == 1


def test_the_check_can_raise_or_be_off_and_spares_eval_and_the_exact_form() -> None:
    with orthogonality_check(mode="raise"):
        with pytest.raises(
            OrthogonalityError, match=r"OFTLinear, adapter 'default': the Cayley-Neumann series"
        ):
            training_forwards(oft_linear(0.4), 1)
        training_forwards(oft_linear(0.4, use_cayley_neumann=False), 1)
        layer = oft_linear(0.4).eval()
        layer(torch.randn(2, 16, dtype=torch.float64))
    with orthogonality_check(mode="off"), warnings.catch_warnings():
        warnings.simplefilter("error", OrthogonalityWarning)
        training_forwards(oft_linear(0.4), 2)
    layer = oft_linear(0.1)
    assert 0.01 < orthoft.orthogonality_report(layer).worst.error < 0.5
    twin = copy.deepcopy(layer)
    with orthogonality_check(threshold=0.5), warnings.catch_warnings():
        warnings.simplefilter("error", OrthogonalityWarning)
        training_forwards(layer, 1)
    with pytest.warns(OrthogonalityWarning):
        training_forwards(twin, 1)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"mode": "loud"}, r"mode must be one of \('warn', 'raise', 'off'\), got 'loud'"),
        ({"every": 0}, "every must be an integer >= 1, got 0"),
        ({"threshold": -1.0}, "threshold must be a positive number, got -1.0"),
    ],
)
def test_invalid_check_settings_are_refused(settings: dict[str, object], match: str) -> None:
    before = orthoft.set_orthogonality_check()
    with pytest.raises(ValueError, match=match):
        orthoft.set_orthogonality_check(**settings)
    assert orthoft.set_orthogonality_check() == before


@pytest.mark.parametrize("scale", [0.02, 0.05, 0.08])
def test_converting_to_the_exact_form_keeps_the_outputs_within_the_series_error(
    tmp_path: Path, scale: float
) -> None:
    base = tiny_llama().double()
    config = orthoft.OFTConfig(target_modules=["q_proj", "v_proj", "down_proj"], oft_block_size=8)
    model = orthoft.get_orthoft_model(copy.deepcopy(base), config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, scale)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, 32, dtype=torch.float64)
    series_out = layer(x)
    naive = copy.deepcopy(layer)
    naive.adapter_options["default"] = naive.adapter_options["default"].__class__(
        **{**vars(naive.adapter_options["default"]), "use_cayley_neumann": False}
    )
    q = orthoft.orthogonality_report(model).rows[0].q_norm
    assert q < 1
    orthoft.convert_cayley_form(model, use_cayley_neumann=False)
    exact_out = layer(x)
    # ||x (R_series - R_exact) W^T|| <= ||x|| ||R_series - R_exact|| ||W||.
    bound = series_bound(q) * x.norm() * torch.linalg.matrix_norm(layer.weight, ord=2)
    difference = (series_out - exact_out).norm()
    assert difference <= bound
    # Flipping the option alone inverts the rotation: a difference of the order of Q itself.
    assert (naive(x) - series_out).norm() > 20 * difference
    assert orthoft.orthogonality_report(model).worst.form == "exact"
    orthoft.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_cayley_neumann"] is False
    loaded = orthoft.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded.model.layers[0].self_attn.q_proj(x), exact_out, rtol=0, atol=0)
    # And back: Q negated twice, the series as before, exactly.
    orthoft.convert_cayley_form(model, use_cayley_neumann=True)
    torch.testing.assert_close(layer(x), series_out, rtol=0, atol=0)


def test_converting_needs_an_unmerged_oft_adapter() -> None:
    boft = orthoft.get_orthoft_model(tiny_llama(), orthoft.BOFTConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"adapter 'default' of \[.*q_proj.*\] is not OFT"):
        orthoft.convert_cayley_form(boft, use_cayley_neumann=False)
    layer = oft_linear(0.1)
    with pytest.raises(ValueError, match="no layer of OFTLinear holds adapter 'other'"):
        orthoft.convert_cayley_form(layer, "other", use_cayley_neumann=False)
    with pytest.raises(ValueError, match="num_cayley_neumann_terms must be an integer >= 1 and at most 64"):
        orthoft.convert_cayley_form(layer, use_cayley_neumann=True, num_cayley_neumann_terms=10**7)
    layer.merge()
    with pytest.raises(ValueError, match=r"is merged in \['OFTLinear'\]; unmerge it first"):
        orthoft.convert_cayley_form(layer, use_cayley_neumann=False)


class Tokens(Dataset):
    def __init__(self, n: int) -> None:
        self.ids = torch.randint(0, 48, (n, 12), generator=torch.Generator().manual_seed(5))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


class Recorder(TrainerCallback):
    """What a reporting integration would see."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        self.logs.append(dict(logs or {}))


def test_trainer_callback_logs_the_worst_layer_at_each_logging_step(tmp_path: Path) -> None:
    model = orthoft.get_orthoft_model(tiny_llama(), orthoft.OFTConfig(target_modules=["q_proj", "v_proj"]))
    recorder = Recorder()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(24), callbacks=[recorder])
    callback = orthoft.OrthogonalityCallback.attach(trainer)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [2, 4, 6]
    errors = [entry["orthogonality_error"] for entry in logged]
    assert all(error > 0 for error in errors)
    final = orthoft.orthogonality_report(model).worst
    assert errors[-1] == pytest.approx(final.error) and logged[-1]["orthogonality_q_norm"] == final.q_norm
    assert callback.worst_layer == f"{final.layer} ({final.adapter})"
    # Callbacks after it (as the reporting integrations are) receive the values.
    assert [log["orthogonality_error"] for log in recorder.logs if "loss" in log] == errors


def test_compiled_training_forwards_skip_the_check_without_a_graph_break() -> None:
    layer = oft_linear(0.4, dtype=torch.float32)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x = torch.randn(3, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OrthogonalityWarning)
        compiled(x).sum().backward()
    torch.testing.assert_close(compiled(x), layer(x))


def test_orthoft_imports_transformers_only_for_the_callback() -> None:
    code = (
        "import sys, orthoft; assert 'transformers' not in sys.modules; "
        "orthoft.OrthogonalityCallback; assert 'transformers' in sys.modules"
    )
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
