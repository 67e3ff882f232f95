"""GPU readiness without Ray: the training worker's step and the serving forward on the GPUs here.

    make gpu-check                          # python3 -m harness.gpu_check, deps from build/gpu-deps
    python -m harness.gpu_check --cpu        # the same check on CPU (gloo, fp32): tests the check

A GPU machine may have PyTorch, transformers and pyarrow but not Ray, DeepSpeed or pydantic, and
no network. ``make gpu-deps`` (here, with PyPI) puts what else the check imports under
``build/gpu-deps`` (DeepSpeed as installed in ``.venv``, pydantic with its compiled core for
Python 3.10-3.13, and small pure-Python packages; ~40 MB), which travels with the working tree.

What runs, on the same synthetic batches (Zipf-popular items, sequences of ``max_len``):
1. the reference: the product's model and loss, fp32 on this machine's CPU, a plain AdamW step
   with the worker's gradient clipping, one process over each whole global batch;
2. the worker's own step: ``training.worker.deepspeed_config`` (ZeRO-2, bf16 on GPU) around the
   same model, optimizer and ``Recommender.loss``, one process per GPU (NCCL), each on its share
   of every global batch, started from the same weights;
3. the serving forward (``Recommender.score``, as a replica calls it) at batch 1 and 32 on one
   GPU and on one CPU thread (what a replica gets).
It prints loss parity (the DeepSpeed run's loss against the reference's, step by step),
samples/s of both, and forward latency, and ends with one JSON line. Without a GPU it says so
and exits 0 (``"skipped": true``) unless ``--cpu`` asks for the dry run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEPS = ROOT / "build" / "gpu-deps"


def use_carried_deps() -> list[str]:
    """Put ``build/gpu-deps`` (pure packages, then this Python's compiled ones) on the path."""
    added = []
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for d in (DEPS / tag, DEPS / "common"):
        if d.is_dir() and str(d) not in sys.path:
            sys.path.insert(0, str(d))
            added.append(str(d))
    return added


use_carried_deps()

import numpy as np  # noqa: E402
import torch  # noqa: E402


def batches(n_items: int, max_len: int, batch: int, steps: int, seed: int) -> list[Any]:
    """``steps`` global batches of (inputs, targets) [batch, max_len]: Zipf-popular items, the
    next item as target (no padding, so every rank's share has the same number of targets)."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, n_items)
    p = 1.0 / ranks**1.05
    p /= p.sum()
    out = []
    for _ in range(steps):
        seq = rng.choice(ranks, size=(batch, max_len + 1), p=p).astype(np.int64)
        out.append((torch.from_numpy(seq[:, :-1].copy()), torch.from_numpy(seq[:, 1:].copy())))
    return out


def _model_cfg() -> Any:
    from training.config import ModelConfig

    return ModelConfig(dropout=0.0)  # no dropout: the two runs see the same function


def reference(args: argparse.Namespace, init: dict[str, Any], data: list[Any]) -> dict[str, Any]:
    """fp32 on CPU, one process over each whole global batch (all cores)."""
    from training.config import TrainerConfig
    from training.model import Recommender

    tcfg = TrainerConfig()
    torch.manual_seed(args.seed)
    model = Recommender.from_state(_model_cfg(), init)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    losses, t0, timed_from = [], 0.0, min(args.warmup, len(data) - 1)
    for i, (x, y) in enumerate(data):
        if i == timed_from:
            t0 = time.perf_counter()
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the worker's gradient_clipping
        opt.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    samples = (len(data) - timed_from) * data[0][0].shape[0]
    return {
        "losses": losses,
        "samples_per_s": samples / seconds,
        "threads": torch.get_num_threads(),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, on_gpu: bool, args: argparse.Namespace,
            init: dict[str, Any], data: list[Any], out: Any) -> None:  # fmt: skip
    """One data-parallel rank: the worker's DeepSpeed engine over its share of every batch."""
    import deepspeed
    import torch.distributed as dist

    from training.config import TrainerConfig
    from training.model import Recommender
    from training.worker import deepspeed_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    if on_gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    per_rank = data[0][0].shape[0] // world
    tcfg = TrainerConfig(batch_size=per_rank)
    torch.manual_seed(args.seed)
    model = Recommender.from_state(_model_cfg(), init)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, config=deepspeed_config(tcfg, on_gpu)
    )
    engine.train()
    losses, t0, timed_from = [], 0.0, min(args.warmup, len(data) - 1)
    for i, (x, y) in enumerate(data):
        if i == timed_from:
            if on_gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        share = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = engine.module.loss(x[share].to(device), y[share].to(device))
        engine.backward(loss)
        engine.step()
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if rank == 0:
        samples = (len(data) - timed_from) * per_rank * world
        params = next(engine.module.parameters())
        out.put({"losses": losses, "samples_per_s": samples / seconds,
                 "param_dtype": str(params.dtype), "world": world,
                 "backend": dist.get_backend()})  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


def deepspeed_run(args: argparse.Namespace, on_gpu: bool, init: dict[str, Any], data: list[Any]
                  ) -> dict[str, Any]:  # fmt: skip
    import torch.multiprocessing as mp

    world = torch.cuda.device_count() if on_gpu else args.cpu_ranks
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    port = _free_port()
    mp.spawn(_worker, args=(world, port, on_gpu, args, init, data, out), nprocs=world, join=True)
    got: dict[str, Any] = out.get()
    return got


def forward_latency(args: argparse.Namespace, init: dict[str, Any], device: torch.device,
                    threads: int | None = None) -> dict[str, float]:  # fmt: skip
    """p50 / p99 ms of ``Recommender.score`` at batch 1 and 32 (fp32, inference mode)."""
    from training.model import Recommender

    if threads is not None:
        torch.set_num_threads(threads)
    model = Recommender.from_state(_model_cfg(), init).to(device).eval()
    out: dict[str, float] = {}
    for b in (1, 32):
        x = batches(args.items, model.cfg.max_len, b, 1, args.seed + b)[0][0].to(device)
        times = []
        with torch.inference_mode():
            for i in range(args.forward_iters + 20):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                model.score(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= 20:
                    times.append((time.perf_counter() - t) * 1000)
        out[f"b{b}_p50_ms"] = round(float(np.percentile(times, 50)), 3)
        out[f"b{b}_p99_ms"] = round(float(np.percentile(times, 99)), 3)
    return out


def parity(ref: list[float], ds: list[float]) -> dict[str, float]:
    """How far the DeepSpeed run's losses are from the reference's, relative, step by step."""
    r, d = np.asarray(ref), np.asarray(ds)
    rel = np.abs(d - r) / np.abs(r)
    half = len(r) // 2
    return {
        "first_step_rel": round(float(rel[0]), 5),
        "max_rel": round(float(rel.max()), 5),
        "mean_rel_second_half": round(float(rel[half:].mean()), 5),
        "ref_first": round(float(r[0]), 4), "ref_last": round(float(r[-1]), 4),
        "ds_first": round(float(d[0]), 4), "ds_last": round(float(d[-1]), 4),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m harness.gpu_check", description=__doc__.split("\n")[0]
    )
    p.add_argument("--cpu", action="store_true", help="dry run on CPU (gloo, fp32), no GPU needed")
    p.add_argument("--cpu-ranks", type=int, default=2, help="processes of the --cpu dry run")
    p.add_argument("--items", type=int, default=1_682, help="catalog size (rows - 1)")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=20, help="steps left out of samples/s")
    p.add_argument("--batch", type=int, default=256, help="global batch (split over ranks)")
    p.add_argument("--forward-iters", type=int, default=200, help="timed forwards per batch size")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not a.cpu
    record: dict[str, Any] = {"bench": "gpu_check", "torch": torch.__version__,
                              "python": sys.version.split()[0]}  # fmt: skip
    if not on_gpu and not a.cpu:
        record.update(skipped=True, reason="no GPU visible (torch.cuda.is_available() is False)")
        print("gpu-check skipped: no GPU visible to PyTorch here; `--cpu` runs the check on CPU")
        print(json.dumps(record), flush=True)
        return
    from training.model import Recommender

    world = torch.cuda.device_count() if on_gpu else a.cpu_ranks
    if a.batch % world:
        p.error(f"--batch {a.batch} must split evenly over {world} ranks")
    t_start = time.perf_counter()
    torch.manual_seed(a.seed)
    init = Recommender(_model_cfg(), a.items + 1).state_dict()
    init = {k: v.detach().clone() for k, v in init.items()}
    data = batches(a.items + 1, _model_cfg().max_len, a.batch, a.steps, a.seed)
    gpus = [torch.cuda.get_device_name(i) for i in range(world)] if on_gpu else []
    print(f"devices: {gpus or f'{world} CPU ranks (dry run)'}; {a.items} items, {a.steps} steps "
          f"of {a.batch} sequences")  # fmt: skip
    ref = reference(a, init, data)
    print(f"reference (CPU fp32, {ref['threads']} threads): {ref['samples_per_s']:.0f} samples/s")
    ds = deepspeed_run(a, on_gpu, init, data)
    print(f"DeepSpeed ZeRO-2 ({ds['backend']}, {ds['world']} ranks, params {ds['param_dtype']}): "
          f"{ds['samples_per_s']:.0f} samples/s")  # fmt: skip
    par = parity(ref["losses"], ds["losses"])
    print(f"loss parity: first step {100 * par['first_step_rel']:.2f}%, worst step "
          f"{100 * par['max_rel']:.2f}%, second half mean {100 * par['mean_rel_second_half']:.2f}%"
          f" (reference {par['ref_first']} -> {par['ref_last']}, DeepSpeed {par['ds_first']} -> "
          f"{par['ds_last']})")  # fmt: skip
    fwd_dev = forward_latency(a, init, torch.device("cuda", 0) if on_gpu else torch.device("cpu"))
    fwd_cpu = forward_latency(a, init, torch.device("cpu"), threads=1)
    print(
        f"serving forward on {'GPU 0' if on_gpu else 'CPU'}: {fwd_dev}; one CPU thread: {fwd_cpu}"
    )
    record.update(
        skipped=False, dry_run_on_cpu=not on_gpu, devices=gpus, ranks=world, items=a.items,
        steps=a.steps, global_batch=a.batch,
        reference_cpu_samples_per_s=round(ref["samples_per_s"]),
        reference_cpu_threads=ref["threads"], deepspeed_samples_per_s=round(ds["samples_per_s"]),
        deepspeed_param_dtype=ds["param_dtype"], backend=ds["backend"], loss_parity=par,
        forward=fwd_dev, forward_one_cpu_thread=fwd_cpu,
        seconds=round(time.perf_counter() - t_start, 1),
    )  # fmt: skip
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
