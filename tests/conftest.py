"""Shared fixtures. The real TGS sample lives in ../shared/tgs beside the checkout
(competition data, never copied into the repo); tests that need it skip without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
TGS_SAMPLE = Path(os.environ.get("TGS_SAMPLE", REPO_ROOT.parent / "shared" / "tgs"))


@pytest.fixture(scope="session")
def tgs_sample() -> Path:
    """The real TGS train/test sample, or a skip saying where it was looked for."""
    if not (TGS_SAMPLE / "train.csv").is_file() or not (TGS_SAMPLE / "train" / "masks").is_dir():
        pytest.skip(f"real TGS sample not found at {TGS_SAMPLE} (set TGS_SAMPLE or place ../shared/tgs)")
    return TGS_SAMPLE


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A small synthetic dataset in the competition layout, generated once per session."""
    from pipeline.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, n_train=120, n_test=30, seed=1)
    return out


class FakeTimmHub:
    """timm's Hugging Face download (`load_state_dict_from_hf`, what `pretrained=True` calls)
    replaced by seeded ImageNet-layout weights (3 input channels, 1000 classes): the pretrained
    path runs end to end with no network. `requests` lists the hub ids asked for."""

    def __init__(self):
        self.requests: list[str] = []
        self._weights: dict[str, dict] = {}

    def weights(self, architecture: str) -> dict:
        import timm
        import torch

        if architecture not in self._weights:
            with torch.random.fork_rng():  # seeded, and the caller's RNG stream is left alone
                torch.manual_seed(7)
                model = timm.create_model(architecture, pretrained=False)
            self._weights[architecture] = {k: v.clone() for k, v in model.state_dict().items()}
        return self._weights[architecture]

    def load_state_dict_from_hf(self, model_id, *args, **kwargs):
        self.requests.append(model_id if isinstance(model_id, str) else model_id[0])
        architecture = self.requests[-1].split("/")[-1].split(".")[0]  # timm/resnet34.a1_in1k
        return {k: v.clone() for k, v in self.weights(architecture).items()}


@pytest.fixture
def fake_timm_hub(monkeypatch) -> FakeTimmHub:
    from timm.models import _builder

    hub = FakeTimmHub()
    monkeypatch.setattr(_builder, "load_state_dict_from_hf", hub.load_state_dict_from_hf)
    return hub


@pytest.fixture
def dead_network(monkeypatch) -> list[str]:
    """timm's downloads fail as they do on a machine without network (the hub's own error,
    raised by hf_hub_download when it can neither reach the hub nor find a cached copy).
    Returns the list of what was asked for."""
    from huggingface_hub.errors import LocalEntryNotFoundError
    from timm.models import _builder

    asked: list[str] = []

    def unreachable(location, *args, **kwargs):
        asked.append(str(location))
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we cannot "
                                      "find the requested files in the local cache. Please check your connection "
                                      "and try again or make sure your Internet connection is on.")

    monkeypatch.setattr(_builder, "load_state_dict_from_hf", unreachable)
    monkeypatch.setattr(_builder, "load_state_dict_from_url", unreachable)
    return asked


def batched(cfg, batch_size: int):
    """`cfg` predicting `batch_size` images at a time (predict_probs reads cfg.predict.batch_size)."""
    import dataclasses

    return dataclasses.replace(cfg, predict=dataclasses.replace(cfg.predict, batch_size=batch_size))
