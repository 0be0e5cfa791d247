"""Train Pixel MeanFlow (pMF). One entry for CPU, one GPU, and torchrun over GPUs and nodes.

    python train.py                                   # embedded default: digits, CPU, < 10 min
    python train.py --preset pMF-B/16 train.data=/data/imagenet/train
    python train.py --preset pMF-B/16 train.data=... train.micro_batch=64    # one GPU: batch 1024 as 16 x 64
    python train.py --preset pMF-B/16 --name ft train.data=... train.init=pMF-B-16.pt   # from the release
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
import contextlib
import errno
import os
import sys
import time

import torch

from pmf_fast import dist, selftest
from pmf_fast.checkpoint import Checkpointer, CheckpointError, TrainState
from pmf_fast.config import DEFAULT_PRESET, ConfigError, save_config
from pmf_fast.data import make_loader
from pmf_fast.ema import EMAs
from pmf_fast.init import init_weights
from pmf_fast.lock import RunBusy
from pmf_fast.log import Log, Meter, progress_bar, rank_zero
from pmf_fast.meanflow import pmf_loss, sample_draws
from pmf_fast.model import PMFDiT
from pmf_fast.optimizers import build_optimizers, lr_factor
from pmf_fast.run import END, Run
from pmf_fast.sampling import TrainSampling
from pmf_fast.stop import Stopper
from pmf_fast.threads import cpu_threads


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
    is_main, threads = rank == 0, torch.get_num_threads()     # restored at the end (the tuner changes it)

    say = rank_zero(is_main)                         # rank 0's lines until the run's Log exists

    # ------------------------------------------------------------ the run, found, checked and claimed before any write
    run = Run(args.preset, args.name, args.resume, overrides, rank, say)
    ended = False                                    # every rank got to the end: they wait for each other there
    with contextlib.ExitStack() as cleanup:          # however main ends: these in reverse, each even if one fails
        cleanup.callback(torch.set_num_threads, threads)
        cleanup.callback(run.close)                  # the lock goes after every rank is done (the barrier below)
        cleanup.callback(lambda: dist.cleanup(wait=ended))
        cfg, m, o, tc = run.cfg, run.cfg.model, run.cfg.objective, run.cfg.train
        if run.stage == "done":
            run.say_done(is_main)
            ended = True
            return run.dir
        micro = check_fits(m, tc, world)            # micro-batches per rank and step (gradient accumulation)
        impl, bf16, compiled = dist.step_settings(tc, device, say)
        with dist.agreed("the kernel self-test"):    # a kernel wrong on one rank's card stops every rank
            selftest.before_training(tc, m, impl, bf16, device, say)

        # ------------------------------------------------------------ data, log
        with dist.agreed("the data set-up"):         # one rank unable to read the data stops every rank
            loader, n_images, n_classes = make_loader(
                tc.data, image_size=m.image_size, batch_per_rank=tc.batch_size // world, rank=rank, world_size=world,
                seed=tc.seed, device=device, num_workers=tc.num_workers, loader=tc.loader, log=say, flip=tc.flip,
                micro=micro)
        if n_classes > m.num_classes:
            raise ConfigError(f"the data has {n_classes} classes but model.num_classes={m.num_classes}")
        steps = tc.steps or tc.epochs * (n_images // tc.batch_size)
        run.make_dir(is_main)
        log = Log(run.dir, is_main, tc.tensorboard, progress_bar(steps, is_main))
        cleanup.callback(log.close)
        log(f"run {run.dir}: {cfg.preset}, {n_images} images, {n_classes} classes, {steps} steps of "
            f"{tc.batch_size} ({world} ranks, {device.type}, {'bf16' if bf16 else 'fp32'}, impl {impl}, "
            f"{tc.parallel if world > 1 else 'one rank'}, blocks {'compiled' if compiled else 'eager'}, "
            f"checkpointing {tc.checkpointing}"
            + (f", {micro} micro-batches of {tc.batch_size // world // micro} per rank" if micro > 1 else "") + ")")

        # ------------------------------------------------------------ model, parallelism, optimizers, EMAs, losses
        torch.manual_seed(tc.seed)                   # the same init on every rank (DDP broadcasts rank 0's anyway)
        model = PMFDiT(m, t_eps=o.t_eps).to(device).set_impl(impl)
        step_model = dist.parallelize(model, compile=compiled, parallel=tc.parallel, checkpointing=tc.checkpointing,
                                      shard_size=tc.shard_size, device=device)
        if tc.init:                                  # a fresh run only; the EMAs below start from these weights too
            init_weights(model, tc, run.meta is not None, log)
        optimizers = build_optimizers(model, cfg.optim)
        emas = EMAs(model, tc.ema_halflives_kimg, tc.batch_size)
        with dist.agreed("loading the perceptual networks"):   # e.g. a weight file missing on one node
            perceptual = perceptual_loss(o, device, log)
        state = TrainState(loader, device, tc.seed, rank, world, micro)
        checkpointer = Checkpointer(run.dir, cfg, model=model, optimizers=optimizers, emas=emas, state=state,
                                    device=device, log=log)
        run.resume(checkpointer, log)                # every stateful piece takes its own state
        if is_main:
            save_config(cfg, os.path.join(run.dir, "config.json"))   # only now: a refused resume changed nothing
        sampling = TrainSampling(cfg, model=model, emas=emas, run_dir=run.dir, num_classes=n_classes, device=device,
                                 rank=rank, world=world, log=log)
        log.advance(state.step)

        # ------------------------------------------------------------ training loop
        stopper, meter = Stopper(tc, state, device, log, run.lock), Meter(tc.batch_size)
        cleanup.callback(stopper.close)              # the signal handlers go
        tuner = cpu_threads(tc.cpu_threads, device, log)
        params = [p for p in model.parameters() if p.requires_grad]
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        while state.step < steps and not state.finished:
            lr = cfg.optim.lr * lr_factor(cfg.optim, state.step, max(state.step / steps, stopper.progress))
            optimizers.set_lr(lr)
            x, y = next(loader)
            # micro-batch i is virtual rank rank * micro + i of a world * micro-rank run (its images, its draws);
            # loss / micro summed over them and averaged over ranks is that run's gradient; one reduction a step
            losses, terms = [], {}
            for i, (xi, yi) in enumerate(zip(x.chunk(micro), y.chunk(micro))):
                draws = sample_draws(xi, o, state.gens[i], state.cpu_gens[i])
                with dist.gradient_sync(step_model, i == micro - 1):
                    with autocast:                   # the forward only: the backward follows the forward's dtypes
                        loss, parts = pmf_loss(step_model, xi, yi, draws, o, m.num_classes, perceptual, impl)
                    (loss / micro).backward()
                losses.append(loss.detach())
                terms = {k: terms.get(k, 0) + v / micro for k, v in parts.items()}   # the whole batch's means
            loss = sum(losses) / micro
            if stopper.skip(loss):                   # train.nonfinite=skip, agreed by all ranks: drop the gradients
                optimizers.zero_grad()
                if stopper.reason:
                    break
                continue
            state.step += 1
            log_step = state.step % tc.log_every == 0 or state.step == steps
            ckpt_step = state.step % tc.ckpt_every == 0 or state.step == steps
            if log_step:
                grads = [p.grad for p in params if p.grad is not None]
                grad_norm = dist.full_tensor(torch.nn.utils.get_total_norm(grads))
            optimizers.step()
            optimizers.zero_grad()
            emas.update(model, state.step)
            meter.add(terms)
            log.advance(1)
            if tuner:
                tuner.step()

            # -------------------------------------------------------- agreed stop check, log, samples, checkpoints
            stopper.check(force=log_step or ckpt_step or sampling.due(state.step))   # before anything is written
            if stopper.nonfinite or stopper.lock_lost:   # nothing more is written in the run directory
                break
            if log_step:
                log.row(state.step, meter.row(lr=lr, grad_norm=round(grad_norm.item(), 4),
                                              elapsed_s=round(time.time() - stopper.t_start, 1)))
            sampling.periodic(state.step)
            state.finished = state.step == steps or stopper.budget_spent
            if ckpt_step or stopper.reason:
                checkpointer.save()
            if stopper.reason:
                break
            if tuner and (log_step or ckpt_step or sampling.due(state.step)):
                tuner.pause()                        # that step's time was not all training

        stopped = end_of_run(stopper, state, sampling, log)
        ended = True                                 # an agreed stop too: every rank raises it together
        if stopped is not None:
            raise stopped
        return run.dir


def end_of_run(stopper, state, sampling, log):
    """Say why the loop ended; after a complete run, the final samples, the digits judge and end.json.
    Returns the error of a stop every rank agreed on (a lost lock, a bad loss), for main to raise."""
    if stopper.lock_lost:
        return RunBusy(f"stopped at step {state.step}: {stopper.reason}: another run took over {log.run_dir}; "
                      "this run wrote nothing more there. Let that run finish, or stop it and run this command "
                      "again to continue from the newest checkpoint")
    if stopper.nonfinite:
        hint = ("raise train.max_nonfinite or lower the learning rate" if stopper.tc.nonfinite == "skip" else
                "set train.nonfinite=skip to skip such steps")
        log(f"stopped at step {state.step}: {stopper.reason}; no checkpoint was written after the loss went bad "
            f"({hint})")
        return FloatingPointError(f"{stopper.reason} at step {state.step}")
    if stopper.reason and not state.finished:
        log(f"stopped at step {state.step} ({stopper.reason}); checkpoint written: run the same command to continue")
        return None
    log(f"trained {state.step} steps in {time.time() - stopper.t_start:.0f} s"
        + (f" ({stopper.reason})" if stopper.reason else ""))
    sampling.final(state.step, time.time() - stopper.t_start)
    log.write_json(END, {"step": state.step})           # last: a run killed before this completes its end stage
    return None


def check_fits(m, tc, world):
    """What a config can only be checked against at launch: the world size and the data's channels.
    Returns the micro-batches per rank and step (train.micro_batch)."""
    if tc.batch_size % world:
        raise ConfigError(f"train.batch_size={tc.batch_size} is not divisible by the {world} ranks")
    per_rank = tc.batch_size // world
    if tc.micro_batch and per_rank % tc.micro_batch:
        raise ConfigError(f"train.micro_batch={tc.micro_batch} does not divide the {per_rank} images per rank "
                          f"(train.batch_size={tc.batch_size} over {world} ranks): use a divisor of {per_rank}")
    if (tc.data == "digits") != (m.in_channels == 1):
        raise ConfigError(f"model.in_channels={m.in_channels} does not fit train.data={tc.data!r}: the digits are "
                          "1-channel, image folders are loaded as RGB (3 channels)")
    return per_rank // tc.micro_batch if tc.micro_batch else 1


def perceptual_loss(o, device, log):
    """LPIPS-VGG and ConvNeXt-V2 feature losses, or None when both weights are 0."""
    if o.lpips_weight <= 0 and o.convnext_weight <= 0:
        return None
    from pmf_fast.perceptual import PerceptualLoss
    log(f"perceptual losses: LPIPS x{o.lpips_weight}, ConvNeXt-V2 x{o.convnext_weight}, t < {o.perceptual_max_t}, "
        f"{o.perceptual_weights} weights")
    return PerceptualLoss(o.lpips_weight, o.convnext_weight, o.perceptual_weights, crop=o.perceptual_crop).to(device)


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except (CheckpointError, FileNotFoundError, RunBusy, dist.RankFailed,   # bad input, a taken run,
            selftest.SelftestFailed) as e:                                  # a kernel wrong on this card
        sys.exit(f"error: {e}")
    except FloatingPointError as e:
        sys.exit(f"error: training stopped: {e}")
    except OSError as e:                                  # e.g. an unwritable or full train.out_dir
        remedy = (" (free space there and run the same command: it continues from the newest checkpoint)"
                  if e.errno == errno.ENOSPC else "")
        sys.exit(f"error: {e.strerror or e}: {e.filename or ''}{remedy}")
