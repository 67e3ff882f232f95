"""The training job of a round: the starting model, and the Ray Train run that trains it.

``prepare_model`` grows the champion to the round's catalog (or builds a fresh model); ``train``
runs one Ray Train job (DeepSpeed workers, ``training.worker``) on the round's examples and
returns the candidate. ``round_job``, ``scaling_config`` and ``run_config`` are shared with the
long-lived run of ``training.session``, which trains rounds on workers kept up between them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from streams.storage import arrow_filesystem
from training.config import ModelConfig, TrainerConfig
from training.data import Examples
from training.errors import RoundFailedError
from training.model import Recommender
from training.round_config import RoundConfig
from training.textinit import init_rows, text_rows
from training.vocab import ItemVocab
from training.worker import train_loop_per_worker


def prepare_model(
    champion: Recommender | None,
    vocab: ItemVocab,
    cfg: ModelConfig,
    titles: dict[str, str],
    new_items: list[str],
) -> Recommender:
    """The round's starting point: the champion grown to the new catalog, or a fresh model.

    In the text item representations the rows' title features (zeros without a title) are
    embedded here, once per item: they travel in the version's weights from then on.
    """
    if champion is None:
        texts = [None, *(titles.get(i) for i in vocab.items())]  # row 0 = padding
        return Recommender(cfg, len(vocab), text_rows(texts) if cfg.item_repr != "id" else None)
    model = Recommender.from_state(champion.cfg, champion.state_dict())
    if model.cfg.item_repr != "id":  # titles place new items; id+text's ID rows start at zero
        model.grow(len(vocab), text=text_rows([titles.get(i) for i in new_items]))
        return model
    init = None
    if cfg.text_init and new_items and all(i in titles for i in new_items):
        known = [i for i in vocab.items()[: champion.n_rows - 1] if i in titles]
        rows = torch.tensor([vocab.index(i) for i in known], dtype=torch.long)
        init = init_rows(
            model.item_embeddings()[rows],
            [titles[i] for i in known],
            [titles[i] for i in new_items],
        )
    model.grow(len(vocab), init)
    return model


def worker_resources(tcfg: TrainerConfig, use_gpu: bool) -> dict[str, float] | None:
    """What one Ray Train worker reserves: CPUs (GPU via use_gpu), and a sliver of the training
    nodes' marker resource so workers are placed on those nodes only."""
    res: dict[str, float] = {} if use_gpu else {"CPU": tcfg.cpus_per_worker}
    return {**res, **tcfg.on_training_nodes(0.01)} or None


def _use_gpu(cfg: RoundConfig) -> bool:
    import ray

    if cfg.trainer.use_gpu is not None:
        return cfg.trainer.use_gpu
    return bool(ray.cluster_resources().get("GPU", 0) >= cfg.trainer.num_workers)


def round_job(
    init: Recommender,
    teacher: Recommender | None,
    examples: Examples,
    cfg: RoundConfig,
    cold: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A round for the workers: its data (for the object store) and its settings."""

    use_gpu = _use_gpu(cfg)
    data = {
        "inputs": examples.inputs,
        "targets": examples.targets,
        "init_state": init.state_numpy(),
        "teacher_state": teacher.state_numpy() if teacher and cfg.replay.kd_weight > 0 else None,
    }
    tcfg = cfg.trainer.model_dump(mode="json")
    if cold:
        tcfg["epochs"] = cfg.trainer.first_round_epochs
    return data, {
        "model_config": init.cfg.model_dump(),
        "trainer_config": tcfg,
        "replay_config": cfg.replay.model_dump(),
        "use_gpu": use_gpu,
    }


def scaling_config(cfg: RoundConfig) -> Any:
    from ray.train import ScalingConfig

    use_gpu = _use_gpu(cfg)
    return ScalingConfig(
        num_workers=cfg.trainer.num_workers,
        use_gpu=use_gpu,
        resources_per_worker=worker_resources(cfg.trainer, use_gpu),
    )


POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def set_poll_interval(trainer: TrainerConfig) -> None:
    """``trainer.poll_s`` for the next Ray Train run this process starts. Ray Train reads its
    controller's poll interval from the environment of the process that calls ``fit()`` (which
    passes it on to the controller, on whatever node that runs), and from nowhere else."""
    os.environ[POLL_ENV] = repr(trainer.poll_s)


def run_config(cfg: RoundConfig, name: str, max_failures: int) -> Any:
    """Ray Train's run settings: checkpoints under ``trainer.storage_path`` (a local path or an
    object-store URI every node reaches), the last one kept."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    storage_fs = None
    if isinstance(cfg.trainer.storage_path, Path):
        storage_path = str(cfg.trainer.storage_path.resolve())
    else:  # object storage: every node of a cluster writes and reads checkpoints there
        storage_fs, storage_path = arrow_filesystem(cfg.trainer.storage_path, cfg.trainer.storage)
    return RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=1),
    )


def train(
    init: Recommender,
    teacher: Recommender | None,
    examples: Examples,
    cfg: RoundConfig,
    cold: bool = False,
    run_id: str | None = None,
) -> tuple[Recommender, dict[str, float]]:
    """Run the Ray Train job; returns the trained model and the last reported metrics.

    ``run_id`` names the run: a run of that name already in storage is resumed from its last
    checkpoint (a round task retried elsewhere after its node died). None: a new name.

    ``cold``: no champion to start from, so ``first_round_epochs`` passes instead of ``epochs``.
    ``teacher`` (the champion) is shipped only when ``replay.kd_weight > 0``; the workers freeze
    it (``Recommender.frozen_teacher``). Raises ``RoundFailedError`` when the job fails after
    Ray Train's retries (``trainer.max_failures``). (``training.session.TrainingSession.train``
    does the same on workers kept up between rounds.)
    """
    import ray
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    data, job_config = round_job(init, teacher, examples, cfg, cold)
    set_poll_interval(cfg.trainer)
    default_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"data_ref": ray.put(data), **job_config},
        scaling_config=scaling_config(cfg),
        run_config=run_config(cfg, f"round-{run_id or default_id}", cfg.trainer.max_failures),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # Ray Train wraps worker deaths and errors in its own types
        raise RoundFailedError(
            f"the training job failed after {cfg.trainer.max_failures} retries: "
            f"{type(err).__name__}: {err}"
        ) from err
    if result.error is not None or result.checkpoint is None:
        raise RoundFailedError(f"the training round produced no checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        model = Recommender.from_file(Path(d) / "model.safetensors", init.cfg)
    model.eval()
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    return model, metrics
