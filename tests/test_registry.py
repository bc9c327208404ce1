"""pipeline/registry.py: every registered loss and model resolves to working code, the config
accepts exactly the registered names, and a loss added at run time trains and validates through
the config like a built-in one (what a contributor's new loss file plus one registry line gets)."""

from __future__ import annotations

import ast

import pytest
import torch

from benchmarks.host_step import Batches, make_batches
from pipeline.config import ModelConfig, load_config
from pipeline.errors import PipelineError
from pipeline.registry import LOSSES, MODELS, Entry
from tests.test_structure import PACKAGE, import_graph


def soft_jaccard(logits: torch.Tensor, target: torch.Tensor, cfg) -> tuple[torch.Tensor, dict]:
    """A loss written the way a contributor writes one (registry.py's contract): per image."""
    probs, labels = torch.sigmoid(logits).flatten(1), target.flatten(1)
    intersection = (probs * labels).sum(1)
    per_image = 1.0 - (intersection + 1.0) / ((probs + labels).sum(1) - intersection + 1.0)
    return per_image, {"jaccard": per_image}


@pytest.fixture
def jaccard_registered():
    LOSSES.register(Entry("soft_jaccard", f"{__name__}:soft_jaccard"))
    yield "soft_jaccard"
    LOSSES.unregister("soft_jaccard")


def batch(seed: int = 0, size: int = 16):
    generator = torch.Generator().manual_seed(seed)
    target = (torch.rand(4, 1, size, size, generator=generator) > 0.5).float()
    target[1] = 0  # an empty image, as ~40% of TGS's are
    return torch.randn(4, 1, size, size, generator=generator, requires_grad=True), target


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_registered_loss_resolves_and_gives_per_image_losses_with_finite_gradients(name):
    from pipeline.config import LossConfig
    from pipeline.losses import SegLoss

    logits, target = batch()
    per_image, parts = LOSSES[name].load()(logits, target, LossConfig(name=name))
    assert per_image.shape == (4,) and parts and all(part.shape == (4,) for part in parts.values())
    loss, logged = SegLoss(LossConfig(name=name))({"mask": logits}, target, epoch=0)
    assert torch.allclose(loss, per_image.mean()) and set(logged) == {*parts, "total"}
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(logits.grad)) and float(logits.grad.abs().sum()) > 0
    assert load_config(None, [f"loss.name={name}"]).loss.name == name


def model_names() -> list[str]:
    return [entry.name + "resnet18" if entry.prefix else entry.name for entry in MODELS.entries()]


@pytest.mark.parametrize("name", model_names())
def test_every_registered_model_resolves_and_takes_inputs_of_its_multiple(name):
    from pipeline.models import create_model

    entry = MODELS[name]
    size = 2 * entry.input_multiple
    cfg = load_config(None, [f"model.name={name}", f"input.size={max(size, 128)}", "model.n_filters=4",
                             "model.decoder_channels=[16,16,8,8,8]"])
    model = create_model(cfg.model).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 1, size, size))["mask"].shape == (1, 1, size, size)
    with pytest.raises(PipelineError, match=f"multiple of {entry.input_multiple} for {name}"):
        load_config(None, [f"model.name={name}", f"input.size={128 + entry.input_multiple // 2}"])


def test_only_models_with_pretrained_weights_take_the_pretrained_options():
    for entry in MODELS.entries():
        name = entry.name + "resnet18" if entry.prefix else entry.name
        for option in ("model.pretrained=true", "model.input_norm=imagenet"):
            if entry.pretrained:
                load_config(None, [f"model.name={name}", option])
            else:
                with pytest.raises(PipelineError, match=f"{option.split('=')[0]}.*{name}"):
                    load_config(None, [f"model.name={name}", option])
    with pytest.raises(PipelineError, match="model.pretrained: seed_unet"):  # built without load_config too
        from pipeline.models import create_model

        create_model(ModelConfig(name="seed_unet", pretrained=True))


def test_a_loss_registered_at_run_time_is_a_config_choice_that_trains_and_validates(jaccard_registered):
    from pipeline.losses import SegLoss
    from pipeline.models import create_model
    from pipeline.optim import build_optimizer
    from pipeline.runtime import resolve_runtime
    from pipeline.train_fold import Training, run_steps, validate

    overrides = ["model.n_filters=4", "model.deep_supervision=true", "input.size=112", "train.batch_size=4",
                 "train.epochs=2", "train.optimizer=sgd", "loss.name=bce", "loss.stage2_from_epoch=1",
                 f"loss.stage2_name={jaccard_registered}"]
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    model = create_model(cfg.model)
    rt = resolve_runtime("off", "off", "cpu", 1)
    parts = Training(model=model, optimizer=build_optimizer(cfg, model), scheduler=None, scaler=rt.grad_scaler(),
                     loss_fn=SegLoss(cfg.loss, cfg.model.deep_supervision), ema=None)
    before = [p.detach().clone() for p in model.parameters()]
    loss = run_steps(model, Batches(make_batches(4, 2)), parts, cfg, rt, epoch=1)  # the stage-2 loss
    assert 0.0 < loss < 1.0  # a Jaccard loss with deep supervision's small terms: not BCE's scale
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    images, masks = (t.numpy() for t in make_batches(6, 1, seed=1)[0])
    probs, val_loss = validate(model, images, masks, parts.loss_fn, cfg, rt, epoch=1)
    expected = soft_jaccard(torch.logit(torch.from_numpy(probs)[:, None].clamp(1e-6, 1 - 1e-6)),
                            torch.from_numpy(masks > 0)[:, None].float(), cfg.loss)[0].mean()
    assert probs.shape == (6, 101, 101) and val_loss == pytest.approx(float(expected), rel=1e-5)


def test_the_config_refuses_a_loss_until_it_is_registered_and_after_it_is_removed(jaccard_registered):
    assert load_config(None, [f"loss.name={jaccard_registered}"]).loss.name == jaccard_registered
    LOSSES.unregister(jaccard_registered)
    with pytest.raises(PipelineError, match=f"'loss.name' is '{jaccard_registered}'; choose one of"):
        load_config(None, [f"loss.name={jaccard_registered}"])
    with pytest.raises(PipelineError, match="registered already"):
        LOSSES.register(Entry("bce", "somewhere:else"))


def test_names_by_prefix_need_a_rest_and_the_list_shows_the_family():
    assert MODELS.find("unet_") is None and MODELS.find("unet_convnext_atto").name == "unet_"
    assert "seed_unet" in MODELS and "seed_unetx" not in MODELS and 3 not in MODELS
    assert sorted(MODELS) == ["seed_unet", "unet_<timm encoder>"]


def _module_level_imports(path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_the_config_and_the_registry_load_without_torch():
    """tune, show and the leaderboard read runs without torch: config.py and what it imports
    (any pipeline module it reaches, lazily or not) import no torch at module level."""
    graph = import_graph()
    reached, todo = set(), ["pipeline.config"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += graph[module]
    assert "pipeline.registry" in reached
    for module in sorted(reached):
        parts = module.split(".")[1:]
        path = PACKAGE.joinpath(*parts).with_suffix(".py")
        path = path if path.exists() else PACKAGE.joinpath(*parts, "__init__.py")
        assert not _module_level_imports(path) & {"torch", "timm", "torchvision"}, module
