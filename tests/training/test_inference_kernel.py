"""DeepSpeed builds no shared-memory inference kernel in a training process (no Ray started)."""

from __future__ import annotations

import time

import deepspeed.ops
from deepspeed.comm.torch import build_shm_op
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

from training.worker import SHM_KERNEL, skip_inference_kernel


def test_the_kernel_is_named_as_deepspeed_names_it() -> None:
    assert ShareMemCommBuilder.NAME == SHM_KERNEL
    assert SHM_KERNEL in deepspeed.ops.__compatible_ops__


def test_after_skipping_deepspeed_builds_and_loads_nothing() -> None:
    skip_inference_kernel()
    started = time.monotonic()
    assert build_shm_op() is None  # what TorchBackend calls at deepspeed.initialize
    assert time.monotonic() - started < 5.0  # no compiler ran (a build takes 30 s and more)
