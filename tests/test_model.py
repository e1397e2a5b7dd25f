"""Model construction: 4-channel backbone (local pretrained weights), modifier, head, parameter groups."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import adapt_input_conv

from src.config import PipelineError, override
from src.model import FeatureModifier, build_model, param_groups, resolve_device


def test_local_pretrained_weights_are_adapted_to_four_channels(tiny_cfg, tmp_path):
    source = timm.create_model("test_resnet", pretrained=False)  # 3 channels, 1000-class classifier
    weights = tmp_path / "test_resnet.pth"
    torch.save(source.state_dict(), weights)
    model = build_model(override(tiny_cfg, **{"model.pretrained": str(weights)}))
    conv = model.backbone.conv1[0].weight
    assert conv.shape[1] == 4
    torch.testing.assert_close(conv, adapt_input_conv(4, source.state_dict()["conv1.0.weight"]))
    # Every other backbone weight is the file's; the classifier was dropped (num_classes=0).
    own = model.backbone.state_dict()
    for name, value in source.state_dict().items():
        if not name.startswith(("conv1.0", "fc.")):
            assert torch.equal(own[name], value), name
    assert not any(name.startswith("fc.") and own[name].numel() for name in own)


def test_missing_weights_file_and_unknown_backbone_are_clear_errors(tiny_cfg):
    with pytest.raises(PipelineError, match="weights file not found"):
        build_model(override(tiny_cfg, **{"model.pretrained": "no/such/file.pth"}))
    with pytest.raises(PipelineError, match="unknown timm model 'resnet_nope'"):
        build_model(override(tiny_cfg, **{"model.backbone": "resnet_nope"}))


def test_net_takes_uint8_images_and_outputs_one_score_per_class(tiny_cfg):
    model = build_model(tiny_cfg).eval()
    images = torch.randint(0, 256, (2, 4, 32, 32), dtype=torch.uint8)
    assert model(images).shape == (2, tiny_cfg.data.num_classes)
    assert build_model(tiny_cfg, out_dim=5).eval()(images).shape == (2, 5)


def test_feature_modifier_starts_as_identity_and_is_trainable():
    modifier = FeatureModifier(16, gate_reduction=4, feature_dropout=0.0).eval()
    features = torch.randn(3, 16)
    torch.testing.assert_close(modifier(features), features)
    modifier(features).sum().backward()
    assert modifier.gate[2].weight.grad.abs().sum() > 0


def test_one_optimizer_groups_backbone_and_modifier_head_without_decay_on_norms_and_biases(tiny_cfg):
    cfg = override(tiny_cfg, **{"train.lr": 1e-3, "train.backbone_lr": 1e-4, "train.weight_decay": 0.05})
    model = build_model(cfg)
    groups = param_groups(model, override(cfg, **{"model.pretrained": True}))  # fine-tuning: its own rate
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(list(model.parameters())) == len({id(p) for p in grouped})  # each exactly once
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    for group in groups:
        in_backbone = {id(p) in backbone_ids for p in group["params"]}
        assert len(in_backbone) == 1
        assert group["lr"] == (1e-4 if in_backbone.pop() else 1e-3)
        assert group["weight_decay"] == (0.0 if all(p.ndim <= 1 for p in group["params"]) else 0.05)
    optimizer = torch.optim.AdamW(groups)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}


def test_cuda_request_without_a_gpu_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(PipelineError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_backbone_lr_zero_is_kept_not_replaced_by_lr(tiny_cfg):
    cfg = override(tiny_cfg, **{"train.lr": 1e-3, "train.backbone_lr": 0.0})
    model = build_model(cfg)
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    for group in param_groups(model, override(cfg, **{"model.pretrained": True})):
        assert group["lr"] == (0.0 if id(group["params"][0]) in backbone_ids else 1e-3)


@pytest.fixture
def fake_device(monkeypatch):
    """Pretend to be a CUDA card of a given compute capability, or a CPU with or without native bf16/fp16 kernels
    (oneDNN's check); warnings already given are forgotten."""
    import src.model

    def fake(capability: tuple[int, int] | None = None, cpu_native: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        for check in ("_is_mkldnn_bf16_supported", "_is_mkldnn_fp16_supported"):
            monkeypatch.setattr(torch.ops.mkldnn, check, lambda: cpu_native)
        src.model.native_cpu_half.cache_clear()

    monkeypatch.setattr(src.model, "_warned", set())
    yield fake
    src.model.native_cpu_half.cache_clear()


@pytest.mark.parametrize("capability, expected", [((6, 0), "fp16"), ((7, 0), "fp16"), ((7, 5), "fp16"),
                                                  ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_is_bf16_from_capability_8_and_fp16_below(fake_device, capability, expected):
    from src.model import resolve_precision

    fake_device(capability)
    chosen = resolve_precision(torch.device("cuda"), "auto")
    assert chosen.name == expected and not chosen.overridden
    assert f"compute capability {capability[0]}.{capability[1]}" in chosen.reason
    assert ("loss scaler" in chosen.reason) == (expected == "fp16")
    assert resolve_precision(torch.device("cuda"), "fp32").name == "fp32"


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_a_cpu_is_bf16_only_with_native_kernels(fake_device, native):
    from src.model import autocast, resolve_precision

    fake_device(None, cpu_native=native)
    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "auto").name == ("bf16" if native else "fp32")
    assert resolve_precision(cpu, "bf16").name == ("bf16" if native else "fp32")
    assert resolve_precision(cpu, "fp32").name == "fp32"
    with autocast(cpu, "auto"):
        out = torch.ones(2, 2) @ torch.ones(2, 2)
    assert out.dtype == (torch.bfloat16 if native else torch.float32)


def test_explicit_bf16_on_a_card_without_native_bf16_warns_once_and_runs_fp16(fake_device, capsys):
    from src.model import effective_precision, resolve_precision

    fake_device((7, 5))
    cuda = torch.device("cuda")
    chosen = resolve_precision(cuda, "bf16")
    assert chosen.name == "fp16" and chosen.overridden
    assert [effective_precision(cuda, "bf16") for _ in range(3)] == ["fp16"] * 3  # e.g. every inference batch
    err = capsys.readouterr().err
    assert err.count("warning: train.precision: bf16 -> fp16") == 1 and "compute capability 7.5" in err
    assert resolve_precision(cuda, "fp16").name == "fp16" and not resolve_precision(cuda, "fp16").overridden
    fake_device((8, 0))
    assert resolve_precision(cuda, "bf16").name == "bf16"


def test_training_parts_use_the_resolved_precision_and_a_scaler_only_for_fp16(fake_device, tiny_data, tmp_path,
                                                                             capsys):
    """build_parts resolves train.precision once: its config holds the name used, its GradScaler runs for fp16
    only, and the choice is said at the start."""
    from src.checkpoint import capture_checkpoint, restore_checkpoint
    from src.train import TrainState, build_parts
    from tests.conftest import tiny_config
    from tests.helpers import write_folds

    cfg = tiny_config(tiny_data, tmp_path, "train.precision=auto")
    write_folds(cfg, 24)
    fake_device(None, cpu_native=False)  # a CPU without native half kernels: auto gives fp32
    parts = fp32_parts = build_parts(cfg, 0, progress=True)
    assert parts.cfg.train.precision == "fp32" and not parts.scaler.is_enabled()
    assert parts.precision.requested == "auto"
    assert "note: train.precision: auto -> fp32 (this CPU has no native bf16 kernels" in capsys.readouterr().err
    fake_device(None, cpu_native=True)
    parts = build_parts(override(cfg, **{"train.precision": "fp16"}), 0, progress=False)
    assert parts.cfg.train.precision == "fp16" and parts.scaler.is_enabled()
    # An fp32 (or bf16) checkpoint resumed in fp16, as on an older card under auto: the scaler starts afresh.
    restore_checkpoint(parts, capture_checkpoint(fp32_parts, TrainState(), []), tmp_path / "last.pt")
    assert parts.scaler.is_enabled() and parts.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()
