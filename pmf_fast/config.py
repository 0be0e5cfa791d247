"""Configuration: dataclasses with a comment per field, presets named as in the paper.

A run is described by one `Config`. `get_config(preset, overrides)` starts from a preset
(`PRESETS`, keyed by the paper's names such as "pMF-B/16") and applies `section.field=value`
overrides from the command line; `validate()` rejects a bad config before any work starts.
The resolved config is written to every run directory and stored in every checkpoint.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Literal

from .atomic import atomic_write
from .kernels.newton_schulz import NS_COEFFICIENTS


class ConfigError(ValueError):
    """A config that cannot run: the message names the field and what to do."""


@dataclass
class ModelConfig:
    image_size: int = 256          # input resolution (square), pixels
    patch_size: int = 16           # p: the sequence is (image_size / p)^2 patches
    in_channels: int = 3           # image channels
    hidden_size: int = 768         # D, the transformer width
    depth: int = 16                # blocks on the u path: shared trunk + u-head
    num_heads: int = 12            # attention heads; head dim D / heads must be a multiple of 4 (2-D RoPE)
    aux_head_depth: int = 8        # blocks in the u-head and in the auxiliary v-head each
    bottleneck: int = 128          # channels of the p x p patch conv (JiT bottleneck; 256 for H)
    mlp_ratio: float = 8 / 3       # SwiGLU hidden = int(D * ratio), rounded up to 8 above D = 1024
    num_classes: int = 1000        # class labels; id num_classes is the null (unconditional) class
    num_class_tokens: int = 8      # in-context tokens per condition (paper section 6, official pmfDiT) ...
    num_cfg_tokens: int = 4        # ... omega tokens
    num_interval_tokens: int = 2   # ... t_min tokens and t_max tokens (each)
    num_time_tokens: int = 4       # ... time tokens, fed h = t - r
    weight_init_constant: float = 0.32  # block linears: std = c / sqrt(fan_in) (official code)


@dataclass
class ObjectiveConfig:
    P_mean: float = 0.8            # logit-normal time sampler: t = sigmoid(N(P_mean, P_std))
    P_std: float = 0.8            # ... its standard deviation
    tr_uniform: float = 0.0        # fraction of (t, r) redrawn from U[0, 1] (0.1 in the long-run recipe)
    data_proportion: float = 0.5   # fraction of the batch with r = t (flow-matching samples)
    noise_scale: float = 1.0       # eps = noise_scale * N(0, I); image_size / 256 in the paper
    t_eps: float = 0.05            # u = (z - x_hat) / max(t, t_eps), the official t -> 0 guard
    cfg_max: float = 7.0           # omega in [1, 1 + cfg_max]
    cfg_beta: float = 1.0          # omega density proportional to omega^-beta
    class_dropout_prob: float = 0.1  # label dropout for CFG
    label_dropout: Literal["first", "bernoulli"] = "first"  # "first": the official cond_drop (docs/official.md)
    norm_p: float = 1.0            # adaptive weight: loss / sg((loss + norm_eps)^norm_p)
    norm_eps: float = 0.01         # ... its eps (keeps the weight finite as the loss goes to 0)
    lpips_weight: float = 0.4      # LPIPS-VGG perceptual loss weight (0 turns it off)
    convnext_weight: float = 0.1   # ConvNeXt-V2 feature loss weight (0 turns it off)
    perceptual_max_t: float = 0.8  # perceptual terms only where t < this
    perceptual_crop: Literal["official", "redraw"] = "official"  # paired crop: one clipped draw, or torchvision's
    perceptual_weights: Literal["pretrained", "random"] = "pretrained"  # local weight files, or random (tests)


@dataclass
class OptimConfig:
    lr: float = 1e-3               # constant, no warm-up (official recipe), for Muon and the NAdamW group
    muon_momentum: float = 0.95    # Nesterov momentum of Muon
    ns_steps: int = 5              # Newton-Schulz iterations
    ns_coefficients: tuple = NS_COEFFICIENTS  # quintic (a, b, c), kernels/newton_schulz.py
    adam_betas: tuple = (0.9, 0.95)  # the Adam group (every non-2-D parameter; Nesterov, docs/optim.md)
    adam_eps: float = 1e-8         # the Adam group's denominator eps
    weight_decay: float = 0.0      # decoupled, both groups (optax decays only Muon's; 0 in the official recipe)
    warmup_steps: int = 0          # linear learning-rate warm-up from 0 (0 = none, the official recipe)
    decay: Literal["none", "cosine"] = "none"  # cosine to min_lr_ratio x lr at train.steps or time_budget_s
    min_lr_ratio: float = 0.0      # the cosine's final lr as a fraction of lr


@dataclass
class TrainConfig:
    data: str = "imagenet"         # a prepared dataset (`python -m pmf_fast.data prepare SRC DST`: memory-mapped
                                   # shards, no decoding), an ImageFolder directory (decoded every epoch), or
                                   # "digits" (scikit-learn, bundled); docs/data.md
    batch_size: int = 1024         # global batch, split evenly over ranks
    epochs: int = 320              # passes over the data (ignored when steps > 0)
    steps: int = 0                 # total optimizer steps; 0 = derive from epochs
    time_budget_s: float = 0.0     # stop after this many seconds of training (0 = no limit)
    ema_halflives_kimg: tuple = (500, 1000, 2000)  # EDM-style EMAs kept at once (official configs)
    seed: int = 42                 # base seed; rank r uses seed + r for its draws
    num_workers: int = 8           # per rank: a folder's PIL DataLoader workers (0 = in the training process) or
                                   # DALI's pipeline threads; a prepared dataset's gather threads (at least 1)
    loader: Literal["auto", "dali", "pil"] = "auto"  # a folder's decoder: DALI (GPU) or PIL; auto = DALI if installed
    flip: bool = False             # random horizontal flips (off in the official recipe)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    impl: Literal["auto", "fast", "eager", "reference"] = "auto"  # the step (docs/kernels.md); auto = fast on CUDA
    selftest: Literal["quick", "off"] = "quick"  # fast on CUDA: the kernels at this run's shapes against eager first
    parallel: Literal["ddp", "fsdp"] = "ddp"  # DistributedDataParallel, or FSDP2 fully_shard per block
    shard_size: int = 0            # fsdp: ranks per shard group; 0 = all (FSDP), a divisor of the world = HSDP
    compile: Literal["auto", "blocks", "none"] = "auto"  # torch.compile per block; auto = blocks for impl fast
    checkpointing: Literal["none", "blocks"] = "none"  # activation checkpointing: recompute each block in backward
    micro_batch: int = 0           # images per forward per rank (gradient accumulation); 0 = the whole per-rank batch
    init: str = ""                 # start from these weights: an official .pt or a pmf-fast checkpoint ("" = random)
    init_weights: Literal["ema", "raw"] = "ema"  # of a pmf-fast checkpoint: its sampling EMA (sample.py's pick) or raw
    nonfinite: Literal["stop", "skip"] = "stop"  # on a non-finite loss: stop (last checkpoint kept) or skip the step
    max_nonfinite: int = 10        # "skip": stop after this many non-finite steps in a row
    stop_check_every: int = 10     # steps between stop checks agreed by all ranks (one small all-reduce each)
    cpu_threads: int = 0           # CPU intra-op threads: n, or 0 = timed and re-checked as the load changes
    tensorboard: bool = True       # also log to TensorBoard (runs/<run>/tb) when the package is installed
    log_every: int = 100           # steps between log lines
    sample_every: int = 5000       # steps between sample grids (0 = off)
    ckpt_every: int = 5000         # steps between checkpoints (and one at the end)
    eval_every: int = 0            # steps between FID evaluations of the sampling EMA (0 = off)
    eval_samples: int = 10000      # samples per periodic FID (logged as fid_10k)
    fid_ref: str = ""              # ADM reference batch .npz, a prepared dataset (its statistics cached in it when
                                   # writable) or an image folder; needs the Inception weights (docs/sampling.md)
    out_dir: str = "runs"          # run directories are made under this folder


@dataclass
class SampleConfig:
    omega: float = 7.5             # CFG scale, a network input (1 NFE)
    t_min: float = 0.1             # guidance interval, a network input
    t_max: float = 0.8             # ... its upper end (guidance applies for t in [t_min, t_max])
    num_steps: int = 1             # sampling steps (all paper results are 1-NFE)
    ema: str = "auto"              # "auto" = largest half-life EMA, "raw", or a half-life in kimg
    grid_per_class: int = 8        # samples per class in the PNG grid written during training
    grid_classes: int = 10         # classes shown in that grid


@dataclass
class Config:
    preset: str = "pMF-B/16"       # the PRESETS name it was built from (get_config; "custom" in from_dict without one)
    # the sections, one dataclass each (above), addressed on the command line as section.field=value
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        cfg = cls(preset=d.get("preset", "custom"))
        for section in ("model", "objective", "optim", "train", "sample"):
            for k, v in d.get(section, {}).items():
                set_field(cfg, f"{section}.{k}", v)
        return cfg


# ----------------------------------------------------------------------------- presets
# Model sizes (paper Tab. 5-7): width, depth, heads and the patch conv's bottleneck (256 for H).
SIZES = {
    "B": dict(hidden_size=768, depth=16, num_heads=12, bottleneck=128),
    "L": dict(hidden_size=1024, depth=32, num_heads=16, bottleneck=128),
    "H": dict(hidden_size=1280, depth=48, num_heads=16, bottleneck=256),
}
# Time sampler and perceptual threshold. OFFICIAL: the released YAML configs of B/16, L/16, B/32.
# LONGER: the paper's "longer training" recipe (Tab. 6/7; H and L/32): P_mean 0.0, 10% uniform (t, r),
# t_thr 0.6, and a doubled noise scale (written per preset: it also scales with resolution). The
# H configs (hsdp branch) agree; the main branch's L/32 YAML leaves tr_uniform off.
OFFICIAL = dict(P_mean=0.8, tr_uniform=0.0, perceptual_max_t=0.8)
LONGER = dict(P_mean=0.0, tr_uniform=0.1, perceptual_max_t=0.6)


def _paper(*, image_size, patch_size, hidden_size, depth, num_heads, bottleneck, noise_scale, P_mean,
           tr_uniform, perceptual_max_t, cfg_beta, epochs, omega, t_min, t_max, ema) -> Config:
    """A paper preset (paper Tab. 5-8; the official configs where the paper is silent). Sampling
    defaults (omega, [t_min, t_max], the EMA half-life in kimg) are the official torch branch's."""
    c = Config()
    c.model = ModelConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, depth=depth,
                          num_heads=num_heads, bottleneck=bottleneck)
    c.objective = ObjectiveConfig(noise_scale=noise_scale, P_mean=P_mean, tr_uniform=tr_uniform,
                                  perceptual_max_t=perceptual_max_t, cfg_beta=cfg_beta)
    c.train = TrainConfig(epochs=epochs, ema_halflives_kimg=(500, 1000, 2000))
    c.sample = SampleConfig(omega=omega, t_min=t_min, t_max=t_max, ema=str(ema))
    return c


def _tiny(*, image_size, patch_size, hidden_size, depth, num_heads, aux_head_depth, data, batch_size, steps,
          time_budget_s=0.0, lr=2e-3, warmup_steps=0, decay="none", stop_check_every=10, noise_scale=1.0,
          data_proportion=0.5, norm_p=1.0, cpu_threads=0) -> Config:
    """A small preset for CPUs: fewer in-context tokens, no perceptual nets, short EMAs, per-sample
    label dropout. Time sampler logit-normal(0, 1) with 10% uniform (t, r), the paper's longer-training
    recipe: on digits it took the judge's Frechet distance at 900 steps from 8.2 to 4.6 (against
    logit-normal(0.8, 0.8))."""
    c = Config()
    c.model = ModelConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, depth=depth,
                          num_heads=num_heads, aux_head_depth=aux_head_depth, bottleneck=max(16, hidden_size // 4),
                          in_channels=1 if data == "digits" else 3, num_classes=10, num_class_tokens=2,
                          num_cfg_tokens=1, num_interval_tokens=1, num_time_tokens=1)
    c.objective = ObjectiveConfig(P_mean=0.0, P_std=1.0, tr_uniform=0.1, lpips_weight=0.0, convnext_weight=0.0,
                                  label_dropout="bernoulli", noise_scale=noise_scale, data_proportion=data_proportion,
                                  norm_p=norm_p)
    c.optim = OptimConfig(lr=lr, warmup_steps=warmup_steps, decay=decay)
    c.train = TrainConfig(data=data, batch_size=batch_size, steps=steps, time_budget_s=time_budget_s,
                          ema_halflives_kimg=(2.0, 8.0), num_workers=0, log_every=50, sample_every=0, ckpt_every=300,
                          stop_check_every=stop_check_every, cpu_threads=cpu_threads)
    # omega 1 (no guidance): on digits, guidance narrowed the samples (omega 1.25 on the preset's two
    # measured runs: distance 1.44x and 2.05x the baseline against 1.35x and 1.63x at omega 1)
    c.sample = SampleConfig(omega=1.0, t_min=0.0, t_max=1.0, ema="auto", grid_per_class=10)
    return c


# Noise scale: image_size / 256 with the official recipe, doubled with the longer one. cfg_beta 2 for
# L/16 is the official YAML's (the paper says 1 throughout). EMA: the half-life (kimg) sampled from.
PRESETS: dict[str, typing.Callable[[], Config]] = {
    "pMF-B/16": lambda: _paper(image_size=256, patch_size=16, **SIZES["B"], **OFFICIAL, noise_scale=1.0,
                               cfg_beta=1.0, epochs=320, omega=7.5, t_min=0.1, t_max=0.8, ema=2000),
    "pMF-L/16": lambda: _paper(image_size=256, patch_size=16, **SIZES["L"], **OFFICIAL, noise_scale=1.0,
                               cfg_beta=2.0, epochs=320, omega=7.0, t_min=0.2, t_max=0.7, ema=1000),
    "pMF-H/16": lambda: _paper(image_size=256, patch_size=16, **SIZES["H"], **LONGER, noise_scale=2.0,
                               cfg_beta=1.0, epochs=360, omega=7.0, t_min=0.2, t_max=0.6, ema=1000),
    "pMF-B/32": lambda: _paper(image_size=512, patch_size=32, **SIZES["B"], **OFFICIAL, noise_scale=2.0,
                               cfg_beta=1.0, epochs=320, omega=6.5, t_min=0.1, t_max=0.7, ema=2000),
    "pMF-L/32": lambda: _paper(image_size=512, patch_size=32, **SIZES["L"], **LONGER, noise_scale=4.0,
                               cfg_beta=1.0, epochs=320, omega=7.5, t_min=0.2, t_max=0.6, ema=2000),
    "pMF-H/32": lambda: _paper(image_size=512, patch_size=32, **SIZES["H"], **LONGER, noise_scale=4.0,
                               cfg_beta=1.0, epochs=360, omega=5.5, t_min=0.1, t_max=0.6, ema=500),
    # 1024 px appears only in the paper's ablation (Tab. 4, 160 epochs); sampling values untuned.
    "pMF-B/64": lambda: _paper(image_size=1024, patch_size=64, **SIZES["B"], **OFFICIAL, noise_scale=4.0,
                               cfg_beta=1.0, epochs=160, omega=6.5, t_min=0.1, t_max=0.7, ema=2000),
    # CPU presets. digits: sklearn's 8x8 digits upsampled to 16 px, the `python train.py` default: 9.5
    # minutes or 2000 steps, the cosine keyed to whichever comes first, so a slow machine gets a complete
    # schedule. Its values came from the ablation in docs/digits.md (2-core CPU, equal time per setting).
    "pMF-T/4-digits": lambda: _tiny(image_size=16, patch_size=4, hidden_size=128, depth=6, num_heads=4,
                                    aux_head_depth=2, data="digits", batch_size=64, steps=2000,
                                    time_budget_s=570.0, lr=1e-2, warmup_steps=30, decay="cosine",
                                    stop_check_every=1, noise_scale=0.4, data_proportion=0.25, norm_p=0.5),
    # A few-step smoke preset for tests.
    "pMF-XS/4-test": lambda: _tiny(image_size=16, patch_size=4, hidden_size=32, depth=3, num_heads=2,
                                   aux_head_depth=1, data="digits", batch_size=8, steps=4,
                                   cpu_threads=2),    # fixed: test runs are compared bit for bit
}
DEFAULT_PRESET = "pMF-T/4-digits"


# ----------------------------------------------------------------------------- differences between configs
def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = tuple(v) if isinstance(v, list) else v
    return out


def config_diff(old: dict, new: dict):
    """[(field, old value, new value)] between two Config.to_dict()s. The old one is read through
    Config.from_dict first, so a field added since it was saved counts as its default, not a change."""
    try:
        filled = Config.from_dict(old).to_dict()
        old = {k: filled.get(k, v) for k, v in old.items()}   # the sections given, with their new fields
    except ConfigError:                              # a field removed since: compare as saved
        pass
    a, b = flat(old), flat(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def describe_diff(diff):
    return ", ".join(f"{k}: {a} -> {b}" for k, a, b in diff[:6]) + (" ..." if len(diff) > 6 else "")


# ----------------------------------------------------------------------------- overrides
def _parse_value(text, current, name: str):
    """Parse a command-line string into the type of the field's current value."""
    if not isinstance(text, str):
        value = text
    elif isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"{name}: expected true/false, got {text!r}")
        return text.lower() in ("true", "1")
    elif isinstance(current, str):
        return text
    else:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ConfigError(f"{name}: cannot parse {text!r} as {type(current).__name__}") from None
    if isinstance(current, bool):
        ok = isinstance(value, bool)
    elif isinstance(current, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(current, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(current, tuple):
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value)
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, type(current))
    if not ok:
        raise ConfigError(f"{name}: expected {type(current).__name__}, got {text!r}")
    return value


def set_field(cfg: Config, key: str, text) -> None:
    """Set `section.field` (or a field name unique across sections) from a string or value."""
    sections = [f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]
    if "." in key:
        section, name = key.split(".", 1)
        if section not in sections:
            raise ConfigError(f"unknown config section {section!r} in {key!r}; sections: {', '.join(sections)}")
    else:
        owners = [s for s in sections if name_in(getattr(cfg, s), key)]
        if len(owners) != 1:
            hint = "ambiguous, use section.field" if owners else "no such field"
            raise ConfigError(f"unknown config field {key!r} ({hint}); see pmf_fast/config.py")
        section, name = owners[0], key
    obj = getattr(cfg, section)
    if not name_in(obj, name):
        names = ", ".join(f.name for f in dataclasses.fields(obj))
        raise ConfigError(f"unknown field {name!r} in section {section!r}; fields: {names}")
    setattr(obj, name, _parse_value(text, getattr(obj, name), f"{section}.{name}"))


def name_in(obj, name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(obj)}


def get_config(preset: str = DEFAULT_PRESET, overrides: typing.Sequence[str] = ()) -> Config:
    """Build a preset, apply `key=value` overrides, validate."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    cfg = PRESETS[preset]()
    cfg.preset = preset
    for item in overrides:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        set_field(cfg, key, value)
    validate(cfg)
    return cfg


def check_choices(cfg: Config) -> None:
    """Every field typed Literal[...] holds one of its choices."""
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(obj):
            continue
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
            value = getattr(obj, f.name)
            if choices and value not in choices:
                names = [repr(c) for c in choices]
                listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
                raise ConfigError(f"{section.name}.{f.name}={value!r}: use {listed}")


# (low, high, low included, high included) of the numeric fields whose range the checks below do not cover
RANGES = {
    "optim.lr": (0.0, math.inf, False, False),
    "optim.muon_momentum": (0.0, 1.0, True, False),
    "optim.adam_eps": (0.0, math.inf, False, False),
    "optim.weight_decay": (0.0, math.inf, True, False),
    "optim.ns_steps": (1, math.inf, True, False),
    "objective.norm_p": (0.0, math.inf, True, False),
    "objective.norm_eps": (0.0, math.inf, False, False),
    "objective.lpips_weight": (0.0, math.inf, True, False),
    "objective.convnext_weight": (0.0, math.inf, True, False),
    "objective.perceptual_max_t": (0.0, 1.0, True, True),
    "objective.cfg_beta": (0.0, math.inf, True, False),
    "train.num_workers": (0, math.inf, True, False),
}


def check_ranges(cfg: Config) -> None:
    """Every float field is finite (1e999 parses as inf) and the fields in RANGES lie in theirs."""
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(obj):
            continue
        for f in dataclasses.fields(obj):
            name, value = f"{section.name}.{f.name}", getattr(obj, f.name)
            values = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise ConfigError(f"{name}={value!r} must be a finite number")
            if name in RANGES:
                lo, hi, lo_in, hi_in = RANGES[name]
                if not ((value >= lo if lo_in else value > lo) and (value <= hi if hi_in else value < hi)):
                    bounds = f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
                    raise ConfigError(f"{name}={value!r} must be in {bounds}")
    if not all(0.0 <= b < 1.0 for b in cfg.optim.adam_betas):
        raise ConfigError(f"optim.adam_betas={cfg.optim.adam_betas} must each be in [0, 1)")


def validate(cfg: Config) -> None:
    """Reject configs that cannot train, with a message naming the field."""
    check_choices(cfg)
    check_ranges(cfg)
    m, o, t, s = cfg.model, cfg.objective, cfg.train, cfg.sample
    if m.image_size % m.patch_size:
        raise ConfigError(f"model.image_size={m.image_size} is not divisible by model.patch_size={m.patch_size}")
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    head_dim = m.hidden_size // m.num_heads
    if head_dim % 4:
        raise ConfigError(f"head dim {head_dim} (hidden_size / num_heads) must be a multiple of 4: "
                          "2-D RoPE splits it into rotated pairs for rows and columns")
    if not 0 <= m.aux_head_depth <= m.depth:
        raise ConfigError(f"model.aux_head_depth={m.aux_head_depth} must be in [0, depth={m.depth}]")
    for name in ("image_size", "patch_size", "hidden_size", "depth", "num_heads", "bottleneck", "num_classes"):
        if getattr(m, name) <= 0:
            raise ConfigError(f"model.{name} must be positive")
    for name in ("data_proportion", "tr_uniform", "class_dropout_prob"):
        if not 0.0 <= getattr(o, name) <= 1.0:
            raise ConfigError(f"objective.{name} must be in [0, 1]")
    if o.noise_scale <= 0 or o.P_std <= 0 or o.cfg_max < 0 or o.t_eps <= 0:
        raise ConfigError("objective.noise_scale, P_std and t_eps must be positive, cfg_max >= 0")
    if len(cfg.optim.ns_coefficients) != 3 or len(cfg.optim.adam_betas) != 2:
        raise ConfigError("optim.ns_coefficients needs 3 numbers and optim.adam_betas 2")
    if t.batch_size <= 0 or t.steps < 0 or t.epochs < 0:
        raise ConfigError("train.batch_size must be positive, train.steps and train.epochs >= 0")
    if any(h <= 0 for h in t.ema_halflives_kimg):
        raise ConfigError("train.ema_halflives_kimg must be positive")
    for name in ("log_every", "ckpt_every"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"train.{name}={getattr(t, name)} must be a positive number of steps")
    for name in ("sample_every", "eval_every"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name}={getattr(t, name)} must be >= 0 (0 turns it off)")
    if t.time_budget_s < 0:
        raise ConfigError(f"train.time_budget_s={t.time_budget_s:g} must be >= 0 seconds (0 = no limit)")
    if t.shard_size < 0:
        raise ConfigError(f"train.shard_size={t.shard_size} must be >= 0 (0 = shard over all ranks)")
    if t.max_nonfinite < 1:
        raise ConfigError(f"train.max_nonfinite={t.max_nonfinite} must be >= 1")
    if t.cpu_threads < 0:
        raise ConfigError(f"train.cpu_threads={t.cpu_threads} must be >= 0 (0 = chosen by timing the steps)")
    if t.micro_batch < 0 or (t.micro_batch and t.batch_size % t.micro_batch):
        raise ConfigError(f"train.micro_batch={t.micro_batch} must be 0 (no accumulation) or divide "
                          f"train.batch_size={t.batch_size}")
    if t.stop_check_every < 1:
        raise ConfigError(f"train.stop_check_every={t.stop_check_every} must be >= 1 step")
    p = cfg.optim
    if p.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps={p.warmup_steps} must be >= 0 (0 = no warm-up)")
    if not 0.0 <= p.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={p.min_lr_ratio:g} must be in [0, 1]")
    if s.ema not in ("auto", "raw"):
        try:
            h = float(s.ema)
        except ValueError:
            h = None
        if h is None or not any(math.isclose(h, k) for k in t.ema_halflives_kimg):
            kept = ", ".join(f"{k:g}" for k in t.ema_halflives_kimg)
            raise ConfigError(f"sample.ema={s.ema!r} names no EMA this run keeps: use 'auto', 'raw' or a half-life "
                              f"in train.ema_halflives_kimg ({kept})")
    if s.omega < 1.0 or not 0.0 <= s.t_min <= s.t_max <= 1.0 or s.num_steps < 1:
        raise ConfigError("sample: need omega >= 1, 0 <= t_min <= t_max <= 1, num_steps >= 1")


def save_config(cfg: Config, path) -> None:
    atomic_write(path, lambda f: json.dump(cfg.to_dict(), f, indent=2), mode="w")
