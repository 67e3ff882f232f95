"""The offline recipe sweep that chose the training defaults (issue 12).

    python -m bench.recipe_sweep base bs32_lr5e3 bs32_lr5e3_s1 ...   # one JSON line per variant

MovieLens-100K leave-one-out, 20 epochs, the epoch picked on validation NDCG@10 (full ranking),
test scored at that epoch. Variants set batch size, peak learning rate, warm-up (epochs) with
cosine decay, dropout, max_len and seed. One thread per run; runs went two side by side on a
shared machine, so ``train_s`` is not comparable across runs. Not a benchmark of record
(``bench.quality`` is); this is the study behind its defaults.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from typing import Any

import torch

from harness.strategies import sequences, vocab_of
from training.config import ModelConfig
from training.data import round_examples
from training.evaluation import ModelScorer, encode, evaluate_cases, leave_one_out, load_table
from training.fit import LrSchedule, fit, torch_step
from training.model import Recommender

VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},  # the old default: batch 128, lr 2e-3, constant
    "base_s1": {"seed": 1},
    "base_s2": {"seed": 2},
    "cos_w1": {"warm": 1.0, "decay": "cosine"},
    "cos_w1_lr5e3": {"warm": 1.0, "decay": "cosine", "lr": 5e-3},
    "cos_w1_len100": {"warm": 1.0, "decay": "cosine", "max_len": 100},
    "lr5e3": {"lr": 5e-3},
    "lr1e2": {"lr": 1e-2},
    "bs64": {"bs": 64},
    "bs32": {"bs": 32},
    "bs32_lr1e2": {"bs": 32, "lr": 1e-2},
    "bs16_lr5e3": {"bs": 16, "lr": 5e-3},
    "bs32_lr5e3": {"bs": 32, "lr": 5e-3},  # the new default
    "bs32_lr5e3_s1": {"bs": 32, "lr": 5e-3, "seed": 1},
    "bs32_lr5e3_s2": {"bs": 32, "lr": 5e-3, "seed": 2},
    "bs32_lr5e3_do01": {"bs": 32, "lr": 5e-3, "dropout": 0.1},
    "bs32_lr5e3_len100": {"bs": 32, "lr": 5e-3, "max_len": 100},
    # 2026-11-29: the best epoch was still the last (20 of 20): more signal per second?
    "bs32_lr5e3_do03": {"bs": 32, "lr": 5e-3, "dropout": 0.3},
    "bs32_lr5e3_do05": {"bs": 32, "lr": 5e-3, "dropout": 0.5},
    "bs32_lr5e3_h1": {"bs": 32, "lr": 5e-3, "n_heads": 1},
    "bs32_lr5e3_d32": {"bs": 32, "lr": 5e-3, "d_model": 32},
    "bs32_lr5e3_l1": {"bs": 32, "lr": 5e-3, "n_layers": 1},
    "bs64_lr1e2": {"bs": 64, "lr": 1e-2},
    "bs32_lr5e3_e30": {"bs": 32, "lr": 5e-3, "epochs": 30},
    # Cheaper models (d32, l1) scored as well in less time: spend the time on epochs.
    "d32_e40": {"bs": 32, "lr": 5e-3, "d_model": 32, "epochs": 40},
    "l1_e30": {"bs": 32, "lr": 5e-3, "n_layers": 1, "epochs": 30},
    "l1_d32_e50": {"bs": 32, "lr": 5e-3, "n_layers": 1, "d_model": 32, "epochs": 50},
    "d32_lr1e2_e40": {"bs": 32, "lr": 1e-2, "d_model": 32, "epochs": 40},
    "l1_d32_e50_s1": {"bs": 32, "lr": 5e-3, "n_layers": 1, "d_model": 32, "epochs": 50, "seed": 1},
    "l1_d32_e50_s2": {"bs": 32, "lr": 5e-3, "n_layers": 1, "d_model": 32, "epochs": 50, "seed": 2},
}


def run(name: str, epochs: int = 20, lr: float = 2e-3, bs: int = 128, warm: float = 0.0,
        decay: str = "constant", seed: int = 0, **model: Any) -> dict[str, Any]:  # fmt: skip
    inter = encode(load_table(None))
    split = leave_one_out(inter)
    full = [inter.items[rows] for rows in inter.rows_by_user()]
    cfg = ModelConfig(text_init=False, **model)
    vocab = vocab_of(inter, split.train_rows)
    torch.manual_seed(seed)
    m = Recommender(cfg, len(vocab))
    ex, _ = round_examples({}, sequences(inter, split.train_rows, vocab), cfg.max_len, False)
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    schedule = LrSchedule.for_run(lr, len(ex), bs, epochs, warm, decay)
    best: dict[str, Any] = {"valid": -1.0}

    def on_epoch(epoch: int, _: dict[str, float]) -> None:
        v = evaluate_cases(ModelScorer(m, vocab, inter.item_ids), split.valid, inter.n_items,
                           [full[c.user] for c in split.valid], seed=0).ndcg10_full  # fmt: skip
        if v > best["valid"]:
            best.update(valid=v, epoch=epoch + 1, state=copy.deepcopy(m.state_dict()))

    t0 = time.perf_counter()
    fit(m, ex, torch_step(m, lr, opt=opt), epochs, bs, seed=seed, on_epoch=on_epoch,
        schedule=schedule, optimizer=opt)  # fmt: skip
    train_s = time.perf_counter() - t0
    chosen = Recommender.from_state(cfg, best["state"])
    t = evaluate_cases(ModelScorer(chosen, vocab, inter.item_ids), split.test, inter.n_items,
                       [full[c.user] for c in split.test], seed=1)  # fmt: skip
    return {"name": name, "valid": round(best["valid"], 4), "test": round(t.ndcg10_full, 4),
            "hr": round(t.hr10_full, 4), "samp": round(t.ndcg10_sampled, 4),
            "best_epoch": best["epoch"], "train_s": round(train_s, 1), "n_ex": len(ex)}  # fmt: skip


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    for name in argv or ["base", "bs32_lr5e3"]:
        print(json.dumps(run(name, **VARIANTS[name])), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
