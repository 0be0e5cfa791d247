"""Train Pixel MeanFlow (pMF). One entry for CPU, one GPU, and torchrun over GPUs and nodes.

    python train.py                                   # embedded default: digits, CPU, < 10 min
    python train.py --preset pMF-B/16 train.data=/data/imagenet/train
    torchrun --standalone --nproc-per-node=8 train.py --preset pMF-B/16 train.data=/data/imagenet/train
    torchrun --nnodes=4 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 \
        --rdzv-id=$JOB train.py --preset pMF-H/16 train.data=/data/imagenet/train
    python train.py --resume runs/<name>              # continue a run from its newest checkpoint

Overrides are `section.field=value` (see pmf_fast/config.py); the resolved config is saved as
config.json in the run directory and inside every checkpoint.
"""
import argparse
import json
import os
import sys
import time

import torch

from pmf_fast import dist
from pmf_fast.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from pmf_fast.config import DEFAULT_PRESET, Config, ConfigError, get_config, save_config, set_field, validate
from pmf_fast.data import make_loader
from pmf_fast.ema import EMAs
from pmf_fast.meanflow import pmf_loss, sample_draws
from pmf_fast.model import PMFDiT
from pmf_fast.muon import build_optimizers
from pmf_fast.sampling import class_grid, judge_digits, pick_ema, save_grid


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=DEFAULT_PRESET, help="a preset name from pmf_fast/config.py")
    p.add_argument("--resume", default="", help="run directory to resume from its newest checkpoint")
    p.add_argument("--name", default="", help="run directory name under train.out_dir (default: preset + time)")
    p.add_argument("--impl", default=None, choices=["auto", "fast", "eager", "reference"],
                   help="training step: fast (Triton kernels, compiled; default on CUDA), eager (default on "
                        "CPU), reference (torch.func.jvp); same as train.impl=...")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    args, unknown = p.parse_known_args(argv)
    return args, args.overrides + unknown + ([f"train.impl={args.impl}"] if args.impl else [])


def main(argv=None):
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)

    # ---------------------------------------------------------------- config (fail before any work)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(latest_checkpoint(args.resume))
        cfg = Config.from_dict(ckpt["config"])
        for item in overrides:                       # e.g. extend train.steps when resuming
            key, _, value = item.lstrip("-").partition("=")
            set_field(cfg, key, value)
        validate(cfg)
        run_dir = args.resume
    else:
        cfg = get_config(args.preset, overrides)
        name = args.name or f"{cfg.preset.replace('/', '-')}_{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = os.path.join(cfg.train.out_dir, name)
    m, o, tc = cfg.model, cfg.objective, cfg.train

    # ---------------------------------------------------------------- distributed, device, precision
    rank, world, _, device = dist.setup()
    is_main = rank == 0
    if tc.batch_size % world:
        raise ConfigError(f"train.batch_size={tc.batch_size} is not divisible by the {world} ranks")
    batch = tc.batch_size // world
    impl = tc.impl if tc.impl != "auto" else ("fast" if device.type == "cuda" else "eager")
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config.json"))

    def log(msg):
        if is_main:
            print(msg, flush=True)

    # ---------------------------------------------------------------- data
    loader, n_images, n_classes = make_loader(tc.data, m.image_size, batch, rank, world, tc.seed, device,
                                              tc.num_workers, tc.loader, log, tc.flip)
    if n_classes > m.num_classes:
        raise ConfigError(f"the data has {n_classes} classes but model.num_classes={m.num_classes}")
    steps = tc.steps or tc.epochs * (n_images // tc.batch_size)
    log(f"run {run_dir}: {cfg.preset}, {n_images} images, {n_classes} classes, {steps} steps of "
        f"{tc.batch_size} ({world} ranks, {device.type}, {'bf16' if bf16 else 'fp32'}, impl {impl})")

    # ---------------------------------------------------------------- model, optimizers, EMAs, losses
    torch.manual_seed(tc.seed)                       # same init on every rank, then broadcast anyway
    model = PMFDiT(m, t_eps=o.t_eps).to(device).set_fast(impl == "fast")
    dist.broadcast_params(model)
    optimizers = build_optimizers(model, cfg.optim, fast=impl == "fast")
    jvp = "reference" if impl == "reference" else "explicit"
    loss_fn = torch.compile(pmf_loss) if impl == "fast" else pmf_loss   # backward compiled by AOTAutograd
    emas = EMAs(model, tc.ema_halflives_kimg, tc.batch_size)
    perceptual = None
    if o.lpips_weight > 0 or o.convnext_weight > 0:
        from pmf_fast.perceptual import PerceptualLoss
        perceptual = PerceptualLoss(o.lpips_weight, o.convnext_weight, o.perceptual_weights).to(device)
        log(f"perceptual losses: LPIPS x{o.lpips_weight}, ConvNeXt-V2 x{o.convnext_weight}, t < "
            f"{o.perceptual_max_t}, {o.perceptual_weights} weights")
    else:
        log("perceptual losses off (objective.lpips_weight = convnext_weight = 0)")
    fid_setup = None
    if tc.eval_every:                                # periodic FID: only when weights and reference exist
        from pmf_fast.eval import InceptionExtractor, reference
        try:
            extractor = InceptionExtractor(device)
            fid_setup = (extractor, reference(tc.fid_ref, extractor, m.image_size)[0])
        except (FileNotFoundError, ValueError) as e:
            log(f"periodic FID skipped: {e}")
    gen = torch.Generator(device).manual_seed(tc.seed + rank)   # every random draw of the objective
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        for opt, s in zip(optimizers, ckpt["optimizers"]):
            opt.load_state_dict(s)
        emas.load_state_dict(ckpt["emas"])
        data = ckpt["data"]                           # one data position per rank
        if len(data) == world:
            loader.load_state_dict(data[rank])
        elif "epoch" in data[0]:                      # index-based positions are the same on every rank
            loader.load_state_dict(data[0])
        else:
            log(f"resuming on {world} ranks from a {len(data)}-rank run: the DALI readers start a fresh epoch")
        if len(ckpt["rng"]) == world:
            gen.set_state(ckpt["rng"][rank])
        else:
            gen.manual_seed(tc.seed + rank + 7919 * ckpt["step"])
            log(f"resuming on {world} ranks from a {len(ckpt['rng'])}-rank run: fresh random streams")
        step = ckpt["step"]
        log(f"resumed from step {step}")
        del ckpt

    def checkpoint():
        rng, data = [gen.get_state()], [loader.state_dict()]
        if dist.is_dist():                             # every rank's random stream and data position
            rng, data = [None] * world, [None] * world
            torch.distributed.all_gather_object(rng, gen.get_state().cpu())
            torch.distributed.all_gather_object(data, loader.state_dict())
        if is_main:
            save_checkpoint(run_dir, step, {
                "model": model.state_dict(), "optimizers": [opt.state_dict() for opt in optimizers],
                "emas": emas.state_dict(), "step": step, "rng": rng, "data": data, "config": cfg.to_dict()})
        dist.barrier()

    def sample_grid():
        ema_model = emas.copy_into(model, pick_ema(emas, cfg.sample.ema))
        path = os.path.join(run_dir, f"samples_{step:08d}.png")
        imgs, _ = class_grid(ema_model, cfg, min(cfg.sample.grid_classes, n_classes), device)
        save_grid(imgs, path, nrow=cfg.sample.grid_per_class)
        return path

    # ---------------------------------------------------------------- training loop
    params = [p for p in model.parameters() if p.requires_grad]
    t_start, t_log, img_log = time.time(), time.time(), 0
    sums = {}
    bar = None
    if is_main and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=step, dynamic_ncols=True)
    while step < steps:
        x, y = next(loader)
        draws = sample_draws(x, o, gen)
        with autocast:
            loss, logs = loss_fn(model, x, y, draws, o, m.num_classes, perceptual, jvp)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; the last checkpoint is intact")
        loss.backward()
        dist.average_grads(params)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        step += 1
        emas.update(model, step)
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v
        img_log += tc.batch_size
        if bar is not None:
            bar.update(1)

        # ------------------------------------------------------------ log, samples, checkpoints
        if step % tc.log_every == 0 or step == steps:
            terms = {k: dist.all_reduce_mean(v).item() / (step % tc.log_every or tc.log_every) for k, v in sums.items()}
            rate = img_log / (time.time() - t_log)
            line = {"step": step, **{k: round(v, 5) for k, v in terms.items()}, "img_per_s": round(rate, 1),
                    "elapsed_s": round(time.time() - t_start, 1)}
            if is_main:
                msg = " ".join(f"{k} {v}" for k, v in line.items())
                (bar.write(msg) if bar is not None else print(msg, flush=True))
                with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
                    f.write(json.dumps(line) + "\n")
            sums, t_log, img_log = {}, time.time(), 0
        if tc.sample_every and step % tc.sample_every == 0 and is_main:
            sample_grid()
        if fid_setup is not None and step % tc.eval_every == 0:
            from pmf_fast.eval import fid_of_model
            ema_model = emas.copy_into(model, pick_ema(emas, cfg.sample.ema))
            value = fid_of_model(ema_model, cfg, tc.eval_samples, *fid_setup, device, rank, world)
            if is_main:
                key = f"fid_{tc.eval_samples // 1000}k" if tc.eval_samples % 1000 == 0 else f"fid_{tc.eval_samples}"
                log(f"step {step} {key} {value:.3f} ({fid_setup[0].name})")
                with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
                    f.write(json.dumps({"step": step, key: value}) + "\n")
        if step % tc.ckpt_every == 0 or step == steps:
            checkpoint()
        if tc.time_budget_s and time.time() - t_start > tc.time_budget_s:
            log(f"time budget of {tc.time_budget_s:.0f} s reached at step {step}")
            checkpoint()
            break
    if bar is not None:
        bar.close()

    # ---------------------------------------------------------------- final samples and, for digits, the judge
    if is_main:
        log(f"trained {step} steps in {time.time() - t_start:.0f} s; samples: {sample_grid()}")
        if tc.data == "digits":
            metrics = judge_digits(emas.copy_into(model, pick_ema(emas, cfg.sample.ema)), cfg, device)
            metrics.update(steps=step, train_seconds=round(time.time() - t_start, 1))
            with open(os.path.join(run_dir, "metrics.json"), "w") as f:
                json.dump(metrics, f, indent=2)
            log("judge: " + json.dumps(metrics))
    dist.cleanup()
    return run_dir


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except (CheckpointError, FileNotFoundError) as e:     # bad input: the message says what and where
        sys.exit(f"error: {e}")
