"""pipeline.models: registry, the Keras-tutorial seed UNet, timm-encoder UNets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.errors import PipelineError
from pipeline.geometry import restore, to_model_input
from pipeline.models import create_model, list_models


def padded_batch(n: int = 2, in_chans: int = 1) -> torch.Tensor:
    """101x101 uint8 images reflect-padded to 128, as the training loop feeds them."""
    images = np.random.default_rng(0).integers(0, 256, size=(n, 101, 101), dtype=np.uint8)
    return to_model_input(images, "pad", 128).expand(-1, in_chans, -1, -1)


def forward_backward(model: torch.nn.Module, x: torch.Tensor) -> dict:
    model.train()
    outputs = model(x)
    loss = outputs["mask"].mean()
    if "stages" in outputs:
        loss = loss + outputs["salt_logit"].mean() + sum(s.mean() for s in outputs["stages"])
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    return outputs


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- the Keras count, by hand
# Keras layer sizes: Conv2D(k x k, cin -> cout) = k*k*cin*cout weights + cout biases (use_bias
# is on by default, even before BatchNormalization); Conv2DTranspose likewise; a
# BatchNormalization has 4 per channel: gamma, beta trainable, moving mean/var not.


def keras_conv(k: int, cin: int, cout: int) -> int:
    return k * k * cin * cout + cout


def keras_conv2d_block(cin: int, n: int, keras_bug: bool) -> int:
    """(trainable) conv+BN+ReLU twice; with the bug Keras keeps only the input-reading conv."""
    if keras_bug:
        return keras_conv(3, cin, n) + 2 * n
    return keras_conv(3, cin, n) + 2 * n + keras_conv(3, n, n) + 2 * n


def keras_unet_trainable_parameters(n: int = 16, keras_bug: bool = False, in_chans: int = 1,
                                    classes: int = 1) -> int:
    total = 0
    cin = in_chans
    for width in (n, 2 * n, 4 * n, 8 * n):  # encoder (pool/dropout have no weights)
        total += keras_conv2d_block(cin, width, keras_bug)
        cin = width
    total += keras_conv2d_block(8 * n, 16 * n, keras_bug)  # middle
    for width in (8 * n, 4 * n, 2 * n, n):  # Conv2DTranspose halves, concat doubles back
        total += keras_conv(3, 2 * width, width) + keras_conv2d_block(2 * width, width, keras_bug)
    return total + keras_conv(1, n, classes)  # the 1x1 output layer


def keras_unet_batchnorm_channels(n: int = 16, keras_bug: bool = False) -> int:
    blocks = [n, 2 * n, 4 * n, 8 * n, 16 * n, 8 * n, 4 * n, 2 * n, n]
    return sum(blocks) * (1 if keras_bug else 2)


@pytest.mark.parametrize("keras_bug", [False, True])
def test_seed_unet_parameter_count_matches_the_keras_model(keras_bug):
    model = create_model(ModelConfig(name="seed_unet", n_filters=16, keras_bug=keras_bug))
    assert count_parameters(model) == keras_unet_trainable_parameters(16, keras_bug)
    # Keras' "non-trainable params" are the BN moving statistics: our running mean/var buffers
    moving = sum(b.numel() for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var")))
    assert moving == 2 * keras_unet_batchnorm_channels(16, keras_bug)


def test_hand_keras_count_agrees_with_a_published_keras_summary():
    # model.summary() of the same 16-filter, 4-block BN UNet in R keras (maju116/platypus,
    # examples/2018 Data Science Bowl): RGB input, 2-class head -> 2,161,666 trainable,
    # 2,944 non-trainable. Ours is 1 channel in, 1 logit out: 2,161,361.
    assert keras_unet_trainable_parameters(16, in_chans=3, classes=2) == 2_161_666
    assert keras_unet_batchnorm_channels(16) * 2 == 2_944
    assert keras_unet_trainable_parameters(16) == 2_161_361


def test_seed_unet_maps_a_padded_101_batch_to_128_logits_and_trains():
    model = create_model(ModelConfig(name="seed_unet"))
    outputs = forward_backward(model, padded_batch())
    assert set(outputs) == {"mask"}
    assert outputs["mask"].shape == (2, 1, 128, 128)
    assert restore(outputs["mask"], "pad").shape == (2, 1, 101, 101)


def test_keras_bug_variant_is_a_different_smaller_network_that_still_trains():
    torch.manual_seed(0)
    fixed = create_model(ModelConfig(name="seed_unet", dropout=0.0)).eval()
    torch.manual_seed(0)
    buggy = create_model(ModelConfig(name="seed_unet", dropout=0.0, keras_bug=True)).eval()
    x = padded_batch()
    assert count_parameters(buggy) < count_parameters(fixed)
    assert not torch.allclose(fixed(x)["mask"], buggy(x)["mask"])
    assert forward_backward(buggy, x)["mask"].shape == (2, 1, 128, 128)


def test_seed_unet_dropout_follows_the_config_and_is_off_in_eval():
    model = create_model(ModelConfig(name="seed_unet", dropout=0.3)).eval()
    assert model.dropout.p == 0.3
    x = padded_batch()
    assert torch.equal(model(x)["mask"], model(x)["mask"])


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_dropout_has_nn_dropouts_distribution(p, channels_last):
    from pipeline.models.blocks import Dropout

    torch.manual_seed(0)
    x = torch.ones(8, 16, 64, 64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    out = Dropout(p).train()(x)
    kept = out != 0
    # keep rate 1 - p (n = 524288: 5 sigma is < 0.004), kept values scaled by 1 / (1 - p)
    assert abs(kept.float().mean().item() - (1 - p)) < 0.004
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # independent elements: no structure along channels or rows (neighbours agree as often as chance)
    same = (kept[:, 1:] == kept[:, :-1]).float().mean().item()
    assert abs(same - ((1 - p) ** 2 + p**2)) < 0.005
    # the gradient flows through the kept elements only, with the same scale
    out.sum().backward()
    assert torch.equal(x.grad != 0, kept) and torch.allclose(x.grad[kept], out[kept])


def test_cpu_dropout_is_seeded_by_torch_and_identity_in_eval():
    from pipeline.models.blocks import Dropout

    x = torch.randn(4, 8, 16, 16)
    torch.manual_seed(1)
    a = Dropout(0.3).train()(x)
    torch.manual_seed(1)
    assert torch.equal(a, Dropout(0.3).train()(x))
    assert not torch.equal(a, Dropout(0.3).train()(x))  # a fresh mask every call
    assert Dropout(0.3).eval()(x) is x and Dropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)


def test_seed_unet_deep_supervision_heads_only_in_training():
    model = create_model(ModelConfig(name="seed_unet", n_filters=8, deep_supervision=True))
    outputs = forward_backward(model, padded_batch())
    assert outputs["salt_logit"].shape == (2,)
    assert [s.shape[-1] for s in outputs["stages"]] == [16, 32, 64]
    assert set(model.eval()(padded_batch())) == {"mask"}


def test_seed_unet_rejects_sizes_that_are_not_multiples_of_16():
    with pytest.raises(PipelineError, match="multiple of 16"):
        create_model(ModelConfig(name="seed_unet"))(torch.zeros(1, 1, 120, 120))


def test_seed_unet_rejects_pretrained_and_a_residual_keras_bug():
    with pytest.raises(PipelineError, match="model.pretrained"):
        create_model(ModelConfig(name="seed_unet", pretrained=True))
    with pytest.raises(PipelineError, match="model.residual"):
        create_model(ModelConfig(name="seed_unet", keras_bug=True, residual=True))


def test_residual_double_conv_adds_the_first_convs_output_to_the_second():
    from pipeline.models.blocks import DoubleConv

    torch.manual_seed(0)
    plain = DoubleConv(3, 4).eval()
    residual = DoubleConv(3, 4, residual=True).eval()
    residual.load_state_dict(plain.state_dict())  # same parameters, same keys
    x = torch.randn(2, 3, 8, 8)
    h = plain[0](x)
    assert torch.allclose(residual(x), h + plain[1](h))
    assert torch.allclose(plain(x), plain[1](h))


@pytest.mark.e2e
def test_seed_unet_with_the_winners_options_trains_and_keeps_the_plain_parameter_names():
    cfg = ModelConfig(name="seed_unet", n_filters=8, residual=True, scse=True, hypercolumn=True,
                      deep_supervision=True)
    model = create_model(cfg)
    outputs = forward_backward(model, padded_batch())
    assert outputs["mask"].shape == (2, 1, 128, 128)
    assert outputs["salt_logit"].shape == (2,)
    assert all(p.grad is not None for p in model.head.parameters())  # the hypercolumn head is used
    plain = set(create_model(ModelConfig(name="seed_unet", n_filters=8)).state_dict())
    # residual adds no parameters: the encoder's keys are the plain model's
    assert {k for k in model.state_dict() if k.startswith("encoder.")} == {k for k in plain if k.startswith("encoder.")}
    assert set(model.eval()(padded_batch())) == {"mask"}


def test_global_context_adds_one_image_level_vector_to_every_pixel_and_starts_as_identity():
    from pipeline.models.blocks import GlobalContext

    block = GlobalContext(8)
    x = torch.randn(2, 8, 7, 7)
    assert torch.equal(block(x), x)  # zero-initialised last conv: a new model is the plain UNet
    torch.nn.init.normal_(block.transform[-1].weight)
    context = block.transform(x)
    assert context.shape == (2, 8, 1, 1)  # one vector per image, added to every pixel
    assert context.abs().sum() > 0 and not torch.allclose(context[0], context[1])
    assert torch.equal(block(x), x + context)


@pytest.mark.parametrize("name", ["seed_unet", "unet_resnet18"])
@pytest.mark.e2e
def test_global_context_centre_trains_and_leaves_the_plain_parameters_alone(name):
    small = dict(n_filters=8) if name == "seed_unet" else dict(decoder_channels=[32, 32, 16, 16, 8])
    model = create_model(ModelConfig(name=name, global_context=True, **small))
    outputs = forward_backward(model, padded_batch())
    assert outputs["mask"].shape == (2, 1, 128, 128)
    assert model.context.transform[-1].weight.grad.abs().sum() > 0  # it learns from the first step
    plain = set(create_model(ModelConfig(name=name, **small)).state_dict())
    assert plain < set(model.state_dict())
    assert {k for k in model.state_dict() if k not in plain} == {
        f"context.transform.{i}.{p}" for i in (1, 3) for p in ("weight", "bias")}


def test_unet_resnet34_maps_a_padded_101_batch_to_128_logits_and_trains():
    model = create_model(ModelConfig(name="unet_resnet34"))
    outputs = forward_backward(model, padded_batch())
    assert set(outputs) == {"mask"}
    assert outputs["mask"].shape == (2, 1, 128, 128)


@pytest.mark.parametrize("encoder", ["resnet18", "efficientnet_b0"])
def test_encoder_unet_with_scse_hypercolumn_and_deep_supervision(encoder):
    cfg = ModelConfig(name=f"unet_{encoder}", scse=True, hypercolumn=True, deep_supervision=True,
                      decoder_channels=[64, 32, 32, 16, 16])
    model = create_model(cfg)
    outputs = forward_backward(model, padded_batch())
    assert outputs["mask"].shape == (2, 1, 128, 128)
    assert outputs["salt_logit"].shape == (2,)
    # every decoder step but the last (which makes the mask): /16, /8, /4, /2
    assert [s.shape[-1] for s in outputs["stages"]] == [8, 16, 32, 64]
    assert set(model.eval()(padded_batch())) == {"mask"}


def test_hypercolumn_head_equals_a_1x1_conv_over_the_concatenated_upsampled_stages():
    from torch.nn import functional as F

    from pipeline.models.blocks import HypercolumnHead

    head = HypercolumnHead([8, 4, 2]).eval()
    stages = [torch.randn(2, c, s, s) for c, s in ((8, 8), (4, 16), (2, 32))]
    upsampled = torch.cat([F.interpolate(f, size=(32, 32), mode="bilinear", align_corners=False)
                           for f in stages], dim=1)
    weight = torch.cat([p.weight for p in head.projections], dim=1)
    expected = head.fuse(F.conv2d(upsampled, weight))
    assert torch.allclose(head(stages, (32, 32)), expected, atol=1e-5)


def test_encoder_unet_takes_three_channel_input():
    model = create_model(ModelConfig(name="unet_resnet18", in_chans=3, decoder_channels=[32, 32, 16, 16, 8]))
    assert model.eval()(padded_batch(in_chans=3))["mask"].shape == (2, 1, 128, 128)


def test_encoder_whose_features_start_at_quarter_resolution_gets_skipless_steps():
    model = create_model(ModelConfig(name="unet_convnext_atto", decoder_channels=[64, 32, 16, 16, 8]))
    assert model.skip_indices == [2, 1, 0, None, None]
    assert forward_backward(model, padded_batch())["mask"].shape == (2, 1, 128, 128)


def test_too_few_decoder_channels_is_a_pipeline_error():
    with pytest.raises(PipelineError, match="needs 5"):
        create_model(ModelConfig(name="unet_resnet18", decoder_channels=[64, 32]))


# ---------------------------------------------------------------- registry and weights


def test_list_models_names_the_seed_and_encoder_unets():
    assert {"seed_unet", "unet_resnet34", "unet_resnet18", "unet_efficientnet_b0"} <= set(list_models())


@pytest.mark.parametrize("name,message", [
    ("vgg_net", "unknown model"),
    ("unet_", "unknown model"),
    ("unet_not_a_timm_model", "not a timm model"),
])
def test_unknown_model_names_are_one_line_pipeline_errors(name, message):
    with pytest.raises(PipelineError, match=message) as info:
        create_model(ModelConfig(name=name))
    assert "\n" not in str(info.value)
    if message == "unknown model":
        assert "seed_unet" in str(info.value) and "unet_<timm encoder>" in str(info.value)


def test_pretrained_without_weights_path_loads_timms_download_with_the_one_channel_adaptation(fake_timm_hub):
    from timm.models import adapt_input_conv

    model = create_model(ModelConfig(name="unet_resnet18", pretrained=True))
    assert len(fake_timm_hub.requests) == 1 and fake_timm_hub.requests[0].startswith("timm/resnet18.")
    imagenet = fake_timm_hub.weights("resnet18")
    assert torch.equal(model.encoder.layer4[1].conv2.weight, imagenet["layer4.1.conv2.weight"])
    assert torch.equal(model.encoder.conv1.weight, adapt_input_conv(1, imagenet["conv1.weight"]))


def test_pretrained_offline_is_one_line_saying_how_to_give_a_local_file(dead_network, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(PipelineError) as info:
        create_model(ModelConfig(name="unet_resnet18", pretrained=True))
    message = str(info.value)
    assert dead_network, "the download went through timm's pretrained loading"
    assert "\n" not in message
    assert message.startswith("model.pretrained: cannot download timm's resnet18 ImageNet weights")
    assert "LocalEntryNotFoundError" in message and "set model.weights_path" in message
    assert "kaggle weights-dataset --encoder resnet18" in message


def test_pretrained_with_hf_hub_offline_says_the_cache_lacks_the_weights(dead_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineError) as info:
        create_model(ModelConfig(name="unet_resnet18", pretrained=True))
    message = str(info.value)
    assert "\n" not in message and "not in the Hugging Face cache and HF_HUB_OFFLINE is set" in message
    assert "set model.weights_path" in message


def test_imagenet_input_norm_feeds_the_encoder_its_pretrained_statistics():
    """model.input_norm: imagenet is x -> (x - mean) / std before the encoder, with timm's
    pretrained_cfg statistics (averaged over RGB for one channel); the checkpoint keys are those
    of the plain model, so predict (which builds the model from the run's config) agrees."""
    plain_cfg = ModelConfig(name="unet_resnet18", decoder_channels=[32, 16, 16, 8, 8])
    normed_cfg = ModelConfig(name="unet_resnet18", decoder_channels=[32, 16, 16, 8, 8], input_norm="imagenet")
    torch.manual_seed(0)
    plain = create_model(plain_cfg).eval()
    normed = create_model(normed_cfg).eval()
    assert normed.state_dict().keys() == plain.state_dict().keys()
    normed.load_state_dict(plain.state_dict())
    mean, std = sum((0.485, 0.456, 0.406)) / 3, sum((0.229, 0.224, 0.225)) / 3
    x = padded_batch()
    with torch.no_grad():
        assert torch.allclose(normed(x)["mask"], plain((x - mean) / std)["mask"], atol=1e-5)
        assert not torch.allclose(normed(x)["mask"], plain(x)["mask"], atol=1e-3)
    three = create_model(ModelConfig(name="unet_resnet18", in_chans=3, input_norm="imagenet"))
    assert three.input_mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


def test_seed_unet_refuses_imagenet_input_norm():
    with pytest.raises(PipelineError, match="model.input_norm imagenet: seed_unet"):
        create_model(ModelConfig(name="seed_unet", input_norm="imagenet"))


def test_a_checkpoint_to_load_next_needs_no_download(dead_network):
    model = create_model(ModelConfig(name="unet_resnet18", pretrained=True), load_pretrained=False)
    assert dead_network == [] and model.encoder.conv1.weight.shape[1] == 1


def test_missing_weights_file_is_named_in_the_error(tmp_path):
    missing = tmp_path / "resnet18.safetensors"
    with pytest.raises(PipelineError, match="resnet18.safetensors: model.weights_path not found"):
        create_model(ModelConfig(name="unet_resnet18", pretrained=True, weights_path=str(missing)))


@pytest.mark.parametrize("files, chosen", [
    (["pytorch_model.bin", "model.safetensors"], "model.safetensors"),  # what timm's hub download holds
    (["resnet18.safetensors", "notes.txt"], "resnet18.safetensors"),    # what `kaggle weights-dataset` writes
    (["resnet34.safetensors", "resnet18.a1_in1k.safetensors"], "resnet18.a1_in1k.safetensors"),
    (["resnet34.safetensors", "efficientnet_b0.pth"], None),           # no clear choice
    (["notes.txt"], None),
])
def test_weights_folder_names_one_clear_file_or_fails_in_one_line(tmp_path, files, chosen):
    from pipeline.models.timm_unet import weights_file

    for name in files:
        (tmp_path / name).write_bytes(b"")
    if chosen:
        assert weights_file(str(tmp_path), "resnet18") == tmp_path / chosen
    else:
        with pytest.raises(PipelineError, match="without one clear resnet18 weights file") as info:
            weights_file(str(tmp_path), "resnet18")
        assert "\n" not in str(info.value)


def test_corrupt_weights_file_is_a_pipeline_error(tmp_path):
    bad = tmp_path / "resnet18.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="cannot load as resnet18 weights") as info:
        create_model(ModelConfig(name="unet_resnet18", pretrained=True, weights_path=str(bad)))
    assert "\n" not in str(info.value)


def test_local_weights_load_without_network_and_first_conv_adapts_to_one_channel(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(3)
    source = timm.create_model("resnet18", pretrained=False)  # 3-channel ImageNet layout
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))

    model = create_model(ModelConfig(name="unet_resnet18", pretrained=True, weights_path=str(path)))
    assert torch.equal(model.encoder.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    # timm folds the RGB filters into one channel by summing them
    assert torch.allclose(model.encoder.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))

    # a folder holding the file (a Kaggle dataset's mount, a hub snapshot) loads the same weights
    folder_model = create_model(ModelConfig(name="unet_resnet18", pretrained=True, weights_path=str(tmp_path)))
    expected = model.encoder.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in folder_model.encoder.state_dict().items())

    # a checkpoint is loaded next at predict time: the weights file need not exist there
    path.unlink()
    rebuilt = create_model(ModelConfig(name="unet_resnet18", pretrained=True, weights_path=str(path)),
                           load_pretrained=False)
    rebuilt.load_state_dict(model.state_dict())


def test_channels_last_computes_the_same_forward_and_gradients_as_plain_fp32():
    """The CPU fast path where there is no native bf16 (`precision: auto` resolves to fp32 there)
    is channels_last alone: a memory layout, so it may not change what the model learns."""
    from pipeline.runtime import resolve_runtime

    rt = resolve_runtime("off", "on", "cpu")
    x = torch.rand(4, 1, 112, 112, generator=torch.Generator().manual_seed(0))
    results = []
    for layout in (torch.contiguous_format, rt.memory_format()):
        torch.manual_seed(0)
        model = create_model(ModelConfig(name="seed_unet", n_filters=8, dropout=0.0)).to(memory_format=layout)
        logits = model(x.contiguous(memory_format=layout))["mask"]
        logits.square().mean().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (plain, plain_grads), (fast, fast_grads) = results
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    # gradients summed over 16x112x112 pixels in another order, some cancelling through BatchNorm,
    # differ by rounding (~0.2% of a tensor's largest entry): compare directions and norms
    for a, b in zip(fast_grads, plain_grads):
        if float(b.norm()) < 1e-6:  # a conv bias right before BatchNorm: its true gradient is 0
            continue
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9999
        assert float(a.norm()) == pytest.approx(float(b.norm()), rel=1e-2)
