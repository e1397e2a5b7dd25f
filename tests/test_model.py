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


def test_half_precision_on_a_cpu_without_native_kernels_runs_in_fp32():
    from src.model import autocast, effective_precision

    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    cpu = torch.device("cpu")
    assert effective_precision(cpu, "bf16") == ("bf16" if native else "fp32")
    assert effective_precision(cpu, "fp32") == "fp32"
    assert effective_precision(torch.device("cuda"), "bf16") == "bf16"  # GPUs keep what the config asks
    with autocast(cpu, "bf16"):
        out = torch.ones(2, 2) @ torch.ones(2, 2)
    assert out.dtype == (torch.bfloat16 if native else torch.float32)
