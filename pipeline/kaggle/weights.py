"""A Kaggle dataset holding a timm encoder's ImageNet weights, so a kernel without internet
can start from them (`kaggle kernel build --weights-dataset OWNER/SLUG`).

    python -m pipeline kaggle weights-dataset --encoder resnet34 --out weights/resnet34 --user YOU [--push]

writes DIR/<encoder>.safetensors (timm's own download and cache, or a local file given with
--weights) and DIR/dataset-metadata.json, checks that the file loads into the one-channel
encoder, and with --push runs `kaggle datasets create -p DIR`. The same folder works as
`model.weights_path` on any offline machine.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.kaggle.credentials import run_kaggle
from pipeline.kaggle.kernel import parse_dataset_id

METADATA_FILE = "dataset-metadata.json"
# Kaggle wants one license name; timm's weights come under their own terms (pretrained_cfg's
# "license", written into the description), which Kaggle's short list does not name.
LICENSE = "other"


def default_slug(encoder: str) -> str:
    """"resnet34" -> "timm-resnet34-imagenet" (Kaggle dataset slugs: 6-50 characters)."""
    core = re.sub(r"[^a-z0-9]+", "-", encoder.lower()).strip("-")[:34].strip("-")
    return f"timm-{core}-imagenet"


def dataset_title(encoder: str) -> str:
    """6-50 characters, as `kaggle datasets create` requires."""
    title = f"timm {encoder} ImageNet weights"
    return title if len(title) <= 50 else f"timm {encoder}"[:50]


def dataset_metadata(encoder: str, user: str, slug: str, source: str) -> dict:
    parse_dataset_id(f"{user}/{slug}", "--user/--slug")
    return {
        "title": dataset_title(encoder),
        "id": f"{user}/{slug}",
        "licenses": [{"name": LICENSE}],
        "description": f"ImageNet weights of the timm encoder `{encoder}` ({source}), for the TGS salt "
                       "pipeline's offline Kaggle kernels: `python -m pipeline kaggle kernel build "
                       f"--weights-dataset {user}/{slug}`.",
    }


def download_timm_weights(encoder: str) -> tuple[dict, str]:
    """The encoder's ImageNet state dict through timm's own pretrained loading (its hub
    download and cache), and a line saying where it came from."""
    import timm

    from pipeline.models.timm_unet import is_network_error

    try:
        model = timm.create_model(encoder, pretrained=True)
    except Exception as exc:  # the hub's, HTTP libraries' and timm's own error types
        if is_network_error(exc):
            line = (str(exc).strip().splitlines() or [""])[0][:160]
            raise PipelineError(f"--encoder {encoder}: cannot download timm's ImageNet weights "
                                f"({type(exc).__name__}: {line}); run this where there is internet, or give "
                                "a local file with --weights") from None
        raise PipelineError(f"--encoder {encoder}: timm cannot load its pretrained weights ({exc})") from None
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    origin = cfg.get("hf_hub_id") or cfg.get("url") or "timm"
    license_name = cfg.get("license")
    return model.state_dict(), f"{origin}, license {license_name}" if license_name else origin


def read_local_weights(path: str, encoder: str) -> tuple[dict, str]:
    """A local weights file (or folder holding one), read with timm's own loader."""
    from timm.models import load_state_dict

    from pipeline.models.timm_unet import weights_file

    found = weights_file(path, encoder)
    try:
        return load_state_dict(str(found)), f"copied from {found.name}"
    except Exception as exc:  # torch/safetensors raise many types for a bad file
        raise PipelineError(f"{found}: cannot read as weights ({exc})") from None


def make_weights_dataset(encoder: str, out: str | os.PathLike, user: str, slug: str | None = None,
                         weights: str | None = None, push: bool = False) -> Path:
    """Write out/<encoder>.safetensors and out/dataset-metadata.json; with push, create the
    Kaggle dataset. Returns the weights file."""
    import timm
    from safetensors.torch import save

    from pipeline.fileio import write_bytes, write_json
    from pipeline.models.timm_unet import create_encoder

    if not timm.is_model(encoder):
        raise PipelineError(f"--encoder {encoder!r}: not a timm model (e.g. resnet34, resnet18, efficientnet_b0)")
    slug = slug or default_slug(encoder)
    parse_dataset_id(f"{user}/{slug}", "--user/--slug")  # before any download
    state_dict, source = read_local_weights(weights, encoder) if weights else download_timm_weights(encoder)
    out = Path(out)
    target = out / f"{encoder}.safetensors"
    write_bytes(target, save({k: v.contiguous() for k, v in state_dict.items()}))
    create_encoder(encoder, 1, str(target))  # the kernel's use of it: one channel, timm's adaptation
    write_json(out / METADATA_FILE, dataset_metadata(encoder, user, slug, source))
    if push:
        output = run_kaggle(["datasets", "create", "-p", str(out)])
        # The CLI reports a refused dataset (e.g. its slug is taken) on stdout and still exits 0.
        refused = [line for line in output.splitlines() if line.startswith("Dataset creation error")]
        if refused:
            raise PipelineError(f"kaggle datasets create: {refused[0].strip()[:300]}")
    return target
