"""Side model artifacts, the PEFT way: `side_config.json` + `side_model.safetensors`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from safetensors.torch import load, save_file

from side_trainer.model import ENCODER_DECODER, SideConfig, SideNetwork, side_network

CONFIG_FILE = "side_config.json"
WEIGHTS_FILE = "side_model.safetensors"

log = logging.getLogger(__name__)


class ArtifactError(ValueError):
    """A model directory that is not a saved side model; the message names the fix."""


def save_side_model(net: SideNetwork, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    net.cfg.save(out_dir / CONFIG_FILE)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, out_dir / WEIGHTS_FILE)
    # On disk before anyone records the model (a service commits it to its database next).
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        with open(out_dir / name, "rb") as handle:
            os.fsync(handle.fileno())


def load_side_model(
    model_dir: str | Path, backbone_dir: Path | None = None, head=None
) -> SideNetwork:
    """Rebuild a saved side network; T5 and generative networks also need the backbone
    directory, for their frozen LM head. `head`: a decoder-only generative network's frozen
    final norm and LM head already in memory (side_trainer.gen_eval.frozen_head), shared with
    the caller instead of a copy read from the checkpoint (SmolLM2's: 113 MB)."""
    model_dir = Path(model_dir)
    if not (model_dir / CONFIG_FILE).is_file() or not (model_dir / WEIGHTS_FILE).is_file():
        raise ArtifactError(
            f"{model_dir} is not a side model directory (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
            f"pass the --out directory of `ladder train` or `ladder finetune`"
        )
    try:
        net = side_network(SideConfig.load(model_dir / CONFIG_FILE))
    except (TypeError, ValueError) as exc:  # a field unknown, missing or out of its choices
        raise ArtifactError(
            f"{model_dir / CONFIG_FILE} is not a valid side config ({exc}); "
            f"train the model again with this Ladder"
        ) from None
    # The file's bytes parsed in memory: safetensors' load_file (and safe_open) keep ~16 KB of
    # each call alive (safetensors 0.8.0, measured: +31 MB resident over 2,000 loads of a 1.3 MB
    # side model; `load` of the bytes keeps nothing), and a server loads evicted side models
    # again and again.
    state = load((model_dir / WEIGHTS_FILE).read_bytes())
    missing = [k for k in net.state_dict() if k not in state and k.endswith("rotary.inv_freq")]
    if missing:
        # Models saved before the rotary frequencies were kept with the weights: the trained
        # frequencies are lost, and it runs with the defaults, as it did whenever it was loaded.
        log.warning(
            "%s was saved without its rotary frequencies (an older Ladder); it runs with "
            "the default ones, not those it was trained with: retrain it for best results",
            model_dir,
        )
        state.update({k: net.state_dict()[k] for k in missing})
    net.load_state_dict(state)
    if net.cfg.task == "generate" and net.cfg.family != ENCODER_DECODER:
        if head is not None:
            net.lm = head
        else:
            from backbone_worker.backbone import resolve

            net.load_frozen(backbone_dir or resolve(net.cfg.backbone))
    elif net.cfg.family == ENCODER_DECODER:
        from backbone_worker.backbone import resolve
        from side_trainer.pruning import load_lm_head

        load_lm_head(net, backbone_dir or resolve(net.cfg.backbone))
    return net.eval()
