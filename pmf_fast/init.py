"""A new run from trained weights (train.init): an official release or a pmf-fast checkpoint.

    init_weights(model, tc, resuming, log)     every rank, after parallelize, before the optimizers

The weights are copied into the model in place (into its FSDP2 shards too); the EMAs, built from
the model afterwards, start from the same weights, the optimizers start fresh and the run counts
from step 0. What train.init may name:
- an official release (the torch branch's pMF-B-16.pt, ...) or any state dict in the official
  layout, through the tested name map (model.official_to_ours; a state dict in our own names passes
  it unchanged). The released inference files hold no aux v-head: the v-head then starts as a copy
  of the u-head, since u at h = 0 is the instantaneous velocity the v-head is trained to predict.
- a pmf-fast checkpoint, ckpt_<step>.pt or a sharded ckpt_<step>.dcp: train.init_weights=ema takes
  the EMA that sample.py samples it with (its sample.ema), raw its raw weights.
A resumed run continues from its own checkpoint and ignores train.init.
"""
import os
import types

import torch

from . import dist
from .checkpoint import META, load_sharded
from .config import ConfigError
from .ema import EMAs
from .model import official_to_ours
from .sampling import pick_ema


def init_weights(model, tc, resuming, log):
    """Copy train.init's weights into `model` (the unwrapped model; a collective under FSDP2), with
    one line saying what was loaded and from where. A file that does not fit the model is a
    ConfigError naming the first differing parameter, raised on every rank."""
    if resuming:
        log(f"train.init={tc.init} ignored: this run resumes from its own checkpoint")
        return
    with dist.agreed(f"reading train.init={tc.init}"):       # no collective inside: file reads and checks
        weights, what = read_init(tc.init, tc.init_weights, model)
    with torch.no_grad():
        if callable(weights):                                  # a sharded checkpoint: DCP reads this rank's part
            weights = weights()
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=True))
    n = sum(p.numel() for p in model.parameters())
    log(f"initialised from {tc.init}: {what}; {n / 1e6:.2f}M parameters, fresh optimizers, the EMAs start from "
        "these weights, step 0")


def read_init(path, which, model):
    """(weights, what): {name: whole tensor} to load (or, for a sharded checkpoint, a function that
    loads it into the model in place) and a description. Reads and checks only: no collective."""
    if not os.path.exists(path):
        raise ConfigError(f"train.init={path}: no such file (give an official release such as pMF-B-16.pt, or a "
                          "pmf-fast checkpoint ckpt_<step>.pt / ckpt_<step>.dcp)")
    want = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, META)):
            raise ConfigError(f"train.init={path} is a directory, not a checkpoint: name one of its checkpoints "
                              "(ckpt_<step>.pt or ckpt_<step>.dcp) or a release .pt")
        return _read_sharded(path, which, model, want)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:                                     # not a torch file, truncated, unreadable
        raise ConfigError(f"train.init={path}: unreadable ({type(e).__name__}: {e}); give an official release "
                          ".pt or a pmf-fast checkpoint") from None
    if isinstance(state, dict) and "model" in state and "config" in state:     # a pmf-fast checkpoint
        key = _ema_key(state["config"], which, state.get("emas", {}))
        weights = state["model"] if key is None else state["emas"][key]
        _check(path, want, {n: tuple(t.shape) for n, t in weights.items()}, state["config"].get("preset"))
        return weights, _described(state["config"], state["train"]["step"], key)
    if not (isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values())):
        raise ConfigError(f"train.init={path} is neither a state dict of tensors (an official release) nor a "
                          "pmf-fast checkpoint")
    weights = {official_to_ours(k): v for k, v in state.items() if official_to_ours(k) is not None}
    what = "official layout"
    if not any(k.startswith("v_heads.") for k in weights) and any(k.startswith("v_heads.") for k in want):
        weights = {k: v for k, v in weights.items() if not k.startswith("v_final_layer.")}
        weights.update({"v" + k[1:]: v for k, v in weights.items() if k.startswith(("u_heads.", "u_final_layer."))})
        what += ", no aux v-head in it: the v-head starts as a copy of the u-head"
    _check(path, want, {n: tuple(t.shape) for n, t in weights.items()}, None)
    return weights, what


def _read_sharded(path, which, model, want):
    """A ckpt_<step>.dcp directory: its meta.pt (config, step) and the DCP metadata (every stored
    tensor's shape) to check against; the tensors themselves are read by the returned loader."""
    import torch.distributed.checkpoint as dcp
    meta = torch.load(os.path.join(path, META), map_location="cpu", weights_only=False)
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    names = [EMAs.name(float(h)) for h in meta["config"]["train"]["ema_halflives_kimg"]]
    emas = {n: None for n in names if any(k.startswith(f"emas.{n}.") for k in stored)}
    key = _ema_key(meta["config"], which, emas)
    prefix = "model." if key is None else f"emas.{key}."
    have = {k[len(prefix):]: tuple(v.size) for k, v in stored.items() if k.startswith(prefix)}
    _check(path, want, have, meta["config"].get("preset"))

    def load():
        params = dict(model.named_parameters())
        into = {n: torch.empty_like(p) for n, p in params.items()}            # DTensors under FSDP2: shards only
        nested = {"model": into} if key is None else {"emas": {key: into}}
        load_sharded(path, nested)
        for n, p in params.items():
            p.copy_(into[n])
    return load, _described(meta["config"], meta["train"]["step"], key) + " (sharded)"


def _ema_key(config, which, emas):
    """The EMA of a pmf-fast checkpoint to start from: None for its raw weights (init_weights=raw, or
    a run that samples from raw), else the key sample.py picks from its sample.ema."""
    choice = config["sample"]["ema"]
    if which == "raw" or choice == "raw":
        return None
    halflives = [float(h) for h in config["train"]["ema_halflives_kimg"]]
    key = pick_ema(types.SimpleNamespace(halflives=halflives, name=EMAs.name, params=emas), choice)
    if key not in emas:
        raise ConfigError(f"train.init: the checkpoint holds no EMA {key} (it has {sorted(emas)}); set "
                          "train.init_weights=raw for its raw weights")
    return key


def _described(config, step, key):
    return f"pmf-fast checkpoint of {config.get('preset', 'a run')} at step {step}, " + (
        "raw weights" if key is None else f"EMA {key} (the one it samples with)")


def _check(path, want, have, preset):
    """One line naming the first parameter where the file and the model differ."""
    diff = None
    for n, shape in want.items():
        if n not in have:
            diff = f"{n} is missing there"
        elif have[n] != shape:
            diff = f"{n} is {list(have[n])} there and {list(shape)} here"
        if diff:
            break
    extra = [n for n in have if n not in want]
    if diff is None and extra:
        diff = f"it holds {extra[0]}, which this model has not"
    if diff:
        source = f" (a {preset} checkpoint)" if preset else ""
        raise ConfigError(f"train.init={path}{source} does not fit this model: {diff}; start from weights of the "
                          "same model (preset, image and patch size)")
