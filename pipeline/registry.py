"""The names a config may choose for its loss and its model, each with the code behind it and
the facts the config checks; the one list of them.

No torch here: config.py validates `loss.name` and `model.name` (and what a model accepts) from
these entries without importing torch, and the code (`"module:function"`) is imported only when
a loss or a model is built (`Entry.load`).

    LOSSES["lovasz"].load()            # -> pipeline.losses.lovasz:lovasz
    MODELS.find("unet_resnet34")       # -> the unet_ entry: input multiple 32, pretrained weights

Adding a loss: its own file, pipeline/losses/<name>.py, with
    def <name>(logits [B,1,H,W], target [B,1,H,W] 0/1, cfg: LossConfig) -> (per_image [B], parts)
(`parts`: the named per-image terms to log, e.g. {"bce": .., "lovasz": ..}), and one line in
LOSSES below. Adding a model family: its module with a `build_<name>(cfg: ModelConfig, load_pretrained)`
returning the nn.Module (pipeline/models/__init__.py says what it returns), and one line in MODELS.
Code outside the package (a test, a notebook) may `register` an entry at run time.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from pipeline.errors import PipelineError, short_repr


@dataclass(frozen=True)
class Entry:
    """A name and where its code is: "package.module:function", imported when first used."""

    name: str
    target: str

    def load(self) -> Callable[..., Any]:
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module), function)


@dataclass(frozen=True)
class ModelEntry(Entry):
    # input.size must be a multiple of this: 2 ** the times the model halves its input
    input_multiple: int = 32
    # has pretrained (ImageNet) weights: model.pretrained and model.input_norm: imagenet need them
    pretrained: bool = False
    # `name` is a prefix: "unet_" + any timm encoder; the builder reads the rest from model.name
    prefix: bool = False

    @property
    def shown(self) -> str:
        return f"{self.name}<timm encoder>" if self.prefix else self.name

    def refusal(self, model_cfg: Any) -> str | None:
        """Why this model cannot be built as `model_cfg` asks (None if it can): the options only a
        model with pretrained weights has."""
        if model_cfg.pretrained and not self.pretrained:
            return (f"model.pretrained: {model_cfg.name} has no pretrained weights "
                    "(use a unet_<encoder> model, e.g. unet_resnet34)")
        if model_cfg.input_norm != "none" and not self.pretrained:
            return (f"model.input_norm {model_cfg.input_norm}: {model_cfg.name} has no pretrained encoder whose "
                    "input statistics to match (use none)")
        return None


class Registry:
    """Entries by name. `name in registry`, iteration (the names as a message lists them) and
    sorted() make it usable wherever config.VALID_CHOICES holds a set of choices."""

    def __init__(self, key: str, noun: str, entries: tuple[Entry, ...]):
        self.key, self.noun = key, noun  # the config key that names an entry, and what it names
        self._entries: dict[str, Entry] = {}
        for entry in entries:
            self.register(entry)

    def register(self, entry: Entry) -> Entry:
        if entry.name in self._entries:
            raise PipelineError(f"{self.key} {entry.name!r} is registered already ({self._entries[entry.name].target})")
        self._entries[entry.name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def find(self, name: str) -> Entry | None:
        """The entry `name` chooses: its own, or a prefix entry's with a non-empty rest."""
        if name in self._entries and not getattr(self._entries[name], "prefix", False):
            return self._entries[name]
        for entry in self._entries.values():
            if getattr(entry, "prefix", False) and name.startswith(entry.name) and len(name) > len(entry.name):
                return entry
        return None

    def __getitem__(self, name: str) -> Entry:
        entry = self.find(name)
        if entry is None:
            raise PipelineError(f"{self.key} {short_repr(name)}: unknown {self.noun}; choose one of {sorted(self)}")
        return entry

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.find(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter([getattr(entry, "shown", entry.name) for entry in self._entries.values()])

    def entries(self) -> list[Entry]:
        return list(self._entries.values())


LOSSES = Registry("loss.name", "loss", (
    Entry("bce", "pipeline.losses.bce:bce"),
    Entry("lovasz", "pipeline.losses.lovasz:lovasz"),
    Entry("bce_lovasz", "pipeline.losses.bce:bce_lovasz"),
    Entry("dice", "pipeline.losses.dice:dice"),
))

MODELS = Registry("model.name", "model", (
    ModelEntry("seed_unet", "pipeline.models.seed_unet:build_seed_unet", input_multiple=16),
    ModelEntry("unet_", "pipeline.models.timm_unet:build_timm_unet", input_multiple=32, pretrained=True, prefix=True),
))
