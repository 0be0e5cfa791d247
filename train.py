"""Train Pixel MeanFlow (pMF). One entry for CPU, one GPU, and torchrun over GPUs and nodes.

    python train.py                                   # embedded default: digits, CPU, < 10 min
    python train.py --preset pMF-B/16 train.data=/data/imagenet/train
    torchrun --standalone --nproc-per-node=8 train.py --preset pMF-B/16 train.data=/data/imagenet/train
    torchrun --nnodes=4 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 \
        --rdzv-id=$JOB --max-restarts=3 train.py --preset pMF-H/16 train.parallel=fsdp train.data=...
    python train.py --resume runs/<name> train.steps=2000   # continue a run, with overrides

Overrides are `section.field=value` (see pmf_fast/config.py); the resolved config is saved as
config.json in the run directory and inside every checkpoint. Running the same command again
resumes the run in runs/<name> from its newest checkpoint. SIGTERM or Ctrl-C: the step finishes,
a checkpoint is written, exit 0.
"""
import argparse
import os
import sys
import time

import torch

from pmf_fast import dist
from pmf_fast.checkpoint import (
    CheckpointError,
    all_finite,
    is_sharded,
    load_sharded,
    remove_stale_temporaries,
    save_checkpoint,
    save_sharded,
)
from pmf_fast.config import DEFAULT_PRESET, ConfigError, save_config
from pmf_fast.data import make_loader
from pmf_fast.ema import EMAs, full
from pmf_fast.meanflow import pmf_loss, sample_draws
from pmf_fast.model import PMFDiT
from pmf_fast.muon import build_optimizers
from pmf_fast.run import END, Log, RunBusy, StopSignals, TrainState, claim_run_dir, find_run, lr_factor, run_dir_of
from pmf_fast.sampling import class_grid, judge_digits, pick_ema, row_labels, save_grid


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=DEFAULT_PRESET, help="a preset name from pmf_fast/config.py")
    p.add_argument("--resume", default="", help="run directory to resume from its newest checkpoint")
    p.add_argument("--name", default="", help="run directory name under train.out_dir (default: the preset's name)")
    p.add_argument("--impl", default=None, choices=["auto", "fast", "eager", "reference"],
                   help="training step: fast (Triton kernels, blocks compiled; default on CUDA), eager (default "
                        "on CPU), reference (torch.func.jvp); same as train.impl=...")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    args, unknown = p.parse_known_args(argv)
    return args, args.overrides + unknown + ([f"train.impl={args.impl}"] if args.impl else [])


def main(argv=None):
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    rank, world, _, device = dist.setup()
    # one owner per run directory: rank 0 holds its lock while training; a refusal stops every rank
    lock = claim_run_dir(run_dir_of(args.preset, args.name, args.resume, overrides), rank == 0)
    try:
        return train(args, overrides, rank, world, device)
    finally:
        if lock is not None:
            lock.release()


def train(args, overrides, rank, world, device):
    is_main = rank == 0

    # ---------------------------------------------------------------- config and run directory (fail before any write)
    cfg, run_dir, meta, ckpt_path, stage = find_run(args.preset, args.name, args.resume, overrides,
                                                    print if is_main else (lambda s: None))
    m, o, tc = cfg.model, cfg.objective, cfg.train
    if stage == "done":
        if is_main:
            print(f"{run_dir} already finished at step {meta['train']['step']}: nothing to do (raise train.steps or "
                  f"train.time_budget_s with --resume to train longer, or pass --name for a new run)")
        dist.cleanup()
        return run_dir
    if tc.batch_size % world:
        raise ConfigError(f"train.batch_size={tc.batch_size} is not divisible by the {world} ranks")
    if (tc.data == "digits") != (m.in_channels == 1):
        raise ConfigError(f"model.in_channels={m.in_channels} does not fit train.data={tc.data!r}: the digits are "
                          "1-channel, image folders are loaded as RGB (3 channels)")
    batch = tc.batch_size // world
    impl = tc.impl if tc.impl != "auto" else ("fast" if device.type == "cuda" else "eager")
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---------------------------------------------------------------- data
    quiet = lambda s: print(s, flush=True) if is_main else None
    loader, n_images, n_classes = make_loader(tc.data, m.image_size, batch, rank, world, tc.seed, device,
                                              tc.num_workers, tc.loader, quiet, tc.flip)
    if n_classes > m.num_classes:
        raise ConfigError(f"the data has {n_classes} classes but model.num_classes={m.num_classes}")
    steps = tc.steps or tc.epochs * (n_images // tc.batch_size)

    # ---------------------------------------------------------------- run directory, log
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        for path in remove_stale_temporaries(run_dir):
            print(f"removed {path}, left by a killed run", flush=True)
    bar = None
    if is_main and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=steps, dynamic_ncols=True)
    log = Log(run_dir, is_main, tc.tensorboard, bar)
    compiled = tc.compile == "blocks" or (tc.compile == "auto" and impl == "fast")
    if compiled and device.type == "cpu" and not dist.cxx_compiler():
        log("train.compile: no C++ compiler for torch.compile on the CPU (g++, or set $CXX); blocks run eager")
        compiled = False
    log(f"run {run_dir}: {cfg.preset}, {n_images} images, {n_classes} classes, {steps} steps of {tc.batch_size} "
        f"({world} ranks, {device.type}, {'bf16' if bf16 else 'fp32'}, impl {impl}, "
        f"{tc.parallel if world > 1 else 'one rank'}"
        f", blocks {'compiled' if compiled else 'eager'}, checkpointing {tc.checkpointing})")

    # ---------------------------------------------------------------- model, parallelism, optimizers, EMAs, losses
    torch.manual_seed(tc.seed)                       # the same init on every rank (DDP broadcasts rank 0's anyway)
    model = PMFDiT(m, t_eps=o.t_eps).to(device).set_impl(impl)
    step_model = dist.parallelize(model, impl, tc.parallel, tc.checkpointing, tc.shard_size, device, compiled)
    optimizers = build_optimizers(model, cfg.optim)
    emas = EMAs(model, tc.ema_halflives_kimg, tc.batch_size)
    perceptual = None
    if o.lpips_weight > 0 or o.convnext_weight > 0:
        from pmf_fast.perceptual import PerceptualLoss
        perceptual = PerceptualLoss(o.lpips_weight, o.convnext_weight, o.perceptual_weights,
                                    crop=o.perceptual_crop).to(device)
        log(f"perceptual losses: LPIPS x{o.lpips_weight}, ConvNeXt-V2 x{o.convnext_weight}, t < "
            f"{o.perceptual_max_t}, {o.perceptual_weights} weights")
    fid_setup = None
    if tc.eval_every:                                # periodic FID: only when weights and reference exist
        from pmf_fast.eval import InceptionExtractor, reference
        try:
            extractor = InceptionExtractor(device)
            fid_setup = (extractor, reference(tc.fid_ref, extractor, m.image_size)[0])
        except (FileNotFoundError, ValueError) as e:
            log(f"periodic FID skipped: {e}")
    state = TrainState(loader, device, tc.seed, rank, world)
    sharded = tc.parallel == "fsdp"

    def shards():                                    # what torch.distributed.checkpoint saves and loads
        from torch.distributed.checkpoint.state_dict import get_state_dict
        msd, osd = get_state_dict(model, optimizers)
        return {"model": msd, "optimizers": osd, "emas": emas.state_dict()}

    if meta is not None:                             # resume: every stateful piece takes its own state
        if sharded != is_sharded(ckpt_path):
            written = "fsdp" if is_sharded(ckpt_path) else "ddp"
            raise ConfigError(f"{ckpt_path} was written with train.parallel={written}; resume with the same "
                              "train.parallel")
        if sharded:
            from torch.distributed.checkpoint.state_dict import set_state_dict
            saved = shards()
            load_sharded(ckpt_path, saved)
            set_state_dict(model, optimizers, model_state_dict=saved["model"], optim_state_dict=saved["optimizers"])
        else:
            model.load_state_dict(meta["model"])
            for opt, s in zip(optimizers, meta["optimizers"]):
                opt.load_state_dict(s)
            emas.load_state_dict(meta["emas"])
        state.load_state_dict(meta["train"], log, finished=stage == "end")
        log.truncate(state.step)
        log(f"resumed from {ckpt_path} at step {state.step}" +
            (": training had finished, its end stage had not; completing it" if stage == "end" else ""))
        del meta
    if is_main:
        save_config(cfg, os.path.join(run_dir, "config.json"))   # only now: a refused resume changed nothing
    if bar is not None:
        bar.update(state.step)

    def checkpoint():
        """Every rank calls it; non-finite weights are never written (all ranks agree first)."""
        if dist.agree_max([not all_finite([p.detach() for p in model.parameters()])], device)[0]:
            log(f"step {state.step}: the weights are not finite; no checkpoint written")
            return
        train_state = state.state_dict()
        if sharded:
            save_sharded(run_dir, state.step, shards(), {"config": cfg.to_dict(), "train": train_state})
        elif is_main:
            save_checkpoint(run_dir, state.step, {
                "model": model.state_dict(), "optimizers": [opt.state_dict() for opt in optimizers],
                "emas": emas.state_dict(), "train": train_state, "config": cfg.to_dict()})
        dist.barrier()

    def sampling_model(choice):
        """An unsharded copy holding the chosen EMA (or the raw weights); collective under FSDP2."""
        key = pick_ema(emas, choice)
        weights = emas.full_state(key) if key else {n: full(p.detach()) for n, p in model.named_parameters()}
        net = PMFDiT(m, t_eps=o.t_eps).to(device)
        net.load_state_dict(weights)
        return net.eval()

    def sample_grid():
        net = sampling_model(cfg.sample.ema)
        if not is_main:
            return None
        path = os.path.join(run_dir, f"samples_{state.step:08d}.png")
        imgs, y = class_grid(net, cfg, min(cfg.sample.grid_classes, n_classes), device)
        save_grid(imgs, path, nrow=cfg.sample.grid_per_class, labels=row_labels(y, cfg.sample.grid_per_class))
        log.image(state.step, "samples", path)
        return path

    # ---------------------------------------------------------------- training loop
    # Host syncs only at the stop checks (every train.stop_check_every steps, and on log and
    # checkpoint steps): there all ranks agree on the time budget, signals and a non-finite loss.
    signals = StopSignals()
    params = [p for p in model.parameters() if p.requires_grad]
    t_start, t_log = time.time() - state.elapsed, time.time()
    sums, n_sum, bad = {}, 0, torch.zeros((), device=device)
    skipped_in_a_row, stop_reason, progress = 0, None, 0.0
    while state.step < steps and not state.finished:
        factor = lr_factor(cfg.optim, state.step, max(state.step / steps, progress))
        for opt in optimizers:
            for g in opt.param_groups:
                g["lr"] = cfg.optim.lr * factor
        x, y = next(loader)
        draws = sample_draws(x, o, state.gen, state.cpu_gen)
        with autocast:
            loss, logs = pmf_loss(step_model, x, y, draws, o, m.num_classes, perceptual, impl)
        if tc.nonfinite == "skip":                   # decided per step, by all ranks: one sync per step
            if dist.agree_max([~torch.isfinite(loss)], device)[0]:
                loss.mul(0).backward()               # DDP / FSDP2 expect the backward their forward set up;
                for opt in optimizers:               # its gradients are dropped
                    opt.zero_grad(set_to_none=True)
                skipped_in_a_row += 1
                log(f"step {state.step + 1}: non-finite loss, update skipped ({skipped_in_a_row} in a row)")
                if skipped_in_a_row >= tc.max_nonfinite:
                    stop_reason = f"{skipped_in_a_row} non-finite losses in a row"
                    break
                continue
            skipped_in_a_row = 0
        else:
            bad = torch.maximum(bad, (~torch.isfinite(loss)).float())   # on the device: no sync here
        loss.backward()
        state.step += 1
        log_step = state.step % tc.log_every == 0 or state.step == steps
        if log_step:
            grad_norm = full(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        emas.update(model, state.step)
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v
        n_sum += 1
        if bar is not None:
            bar.update(1)

        # ------------------------------------------------------------ stop checks (agreed), log, samples, checkpoints
        ckpt_step = state.step % tc.ckpt_every == 0 or state.step == steps
        if log_step or ckpt_step or state.step % tc.stop_check_every == 0:
            state.elapsed = time.time() - t_start
            nonfinite, state.elapsed, signal_seen = dist.agree_max([bad, state.elapsed, signals.received is not None],
                                                                  device)
            progress = state.elapsed / tc.time_budget_s if tc.time_budget_s else 0.0
            if nonfinite:
                stop_reason = "non-finite loss"
                break
            if signal_seen:
                stop_reason = f"{signals.received or 'a signal'} received"
            elif tc.time_budget_s and state.elapsed >= tc.time_budget_s:
                stop_reason = f"time budget of {tc.time_budget_s:.0f} s reached"
        if log_step:
            terms = {k: dist.all_reduce_mean(v).item() / n_sum for k, v in sums.items()}
            rate = n_sum * tc.batch_size / (time.time() - t_log)
            log.row(state.step, {**{k: round(v, 5) for k, v in terms.items()}, "lr": cfg.optim.lr * factor,
                                 "grad_norm": round(grad_norm.item(), 4), "img_per_s": round(rate, 1),
                                 "elapsed_s": round(time.time() - t_start, 1)})
            sums, n_sum, t_log = {}, 0, time.time()
        if tc.sample_every and state.step % tc.sample_every == 0:
            sample_grid()
        if fid_setup is not None and state.step % tc.eval_every == 0:
            from pmf_fast.sampling import fid_of_model
            value = fid_of_model(sampling_model(cfg.sample.ema), cfg, tc.eval_samples, *fid_setup, device, rank, world)
            key = f"fid_{tc.eval_samples // 1000}k" if tc.eval_samples % 1000 == 0 else f"fid_{tc.eval_samples}"
            log.row(state.step, {key: value})
        state.finished = state.step == steps or (stop_reason or "").startswith("time budget")
        if ckpt_step or stop_reason:
            checkpoint()
        if stop_reason:
            break
    signals.restore()

    # ---------------------------------------------------------------- end: why, final samples, the digits judge
    if stop_reason and "non-finite" in stop_reason:
        log(f"stopped at step {state.step}: {stop_reason}; no checkpoint was written after the loss went bad "
            f"(set train.nonfinite=skip to skip such steps)")
        log.close()
        dist.cleanup()
        raise FloatingPointError(f"{stop_reason} at step {state.step}")
    if stop_reason and not state.finished:
        log(f"stopped at step {state.step} ({stop_reason}); checkpoint written: run the same command to continue")
    else:
        log(f"trained {state.step} steps in {time.time() - t_start:.0f} s"
            + (f" ({stop_reason})" if stop_reason else ""))
        path = sample_grid()
        log(f"samples: {path}")
        if tc.data == "digits":
            net = sampling_model(cfg.sample.ema)
            if is_main:
                metrics = judge_digits(net, cfg, device)
                metrics.update(steps=state.step, train_seconds=round(time.time() - t_start, 1))
                log.write_json("metrics.json", metrics)
                log.scalars(state.step, {f"judge/{k}": v for k, v in metrics.items()})
                log("judge: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        log.write_json(END, {"step": state.step})   # last: a run killed before this completes its end stage
    log.close()
    dist.cleanup()
    return run_dir


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except (CheckpointError, FileNotFoundError, RunBusy) as e:   # bad input or a taken run: what and where
        sys.exit(f"error: {e}")
    except FloatingPointError as e:
        sys.exit(f"error: training stopped: {e}")
    except OSError as e:                                  # e.g. an unwritable or full train.out_dir
        sys.exit(f"error: {e.strerror or e}: {e.filename or ''}")
