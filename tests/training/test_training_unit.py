"""Learning-side units without Ray: vocab, data windows, reservoir, registry integrity, gate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training.data_gen import synthetic_table
from training.config import GateConfig, ModelConfig
from training.data import Examples, round_examples, user_sequences, windows
from training.fit import fit, torch_step
from training.gate import gate
from training.metrics import evaluate, ndcg_hr
from training.model import Recommender, save_weights
from training.registry import Registry, RegistryIntegrityError
from training.replay import Reservoir
from training.vocab import ItemVocab


def test_vocab_only_appends() -> None:
    v = ItemVocab(["a", "b"])
    assert v.add(["b", "c"]) == ["c"]
    assert [v.index(x) for x in "abc"] == [1, 2, 3]
    w = ItemVocab.from_json(v.to_json())
    assert w.items() == ["a", "b", "c"] and len(w) == 4


def test_windows_only_predict_new_events() -> None:
    ex = windows([5, 6, 7, 8, 9], first_target=3, max_len=3)
    # Targets at or after index 3 (items 8, 9) carry loss; context items do not.
    assert sorted(int(t) for t in ex.targets.flatten() if t) == [8, 9]
    assert ex.inputs.shape == (1, 3) and list(ex.inputs[0]) == [6, 7, 8]


@pytest.mark.parametrize("n", [1, 2, 7, 64, 65, 129])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_give_every_rank_the_same_steps_and_cover_all_examples(n: int, world: int) -> None:
    # Unequal step counts deadlock DeepSpeed's all-reduce at an epoch's end (seen: n odd, world 2).
    rows = np.arange(n, dtype=np.int64).reshape(n, 1)
    ex = Examples(rows, rows.copy())
    shards = [ex.shard(r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    assert len(shards[0]) * world - n < world  # pads at most world - 1
    assert set(np.concatenate([s.inputs[:, 0] for s in shards]).tolist()) == set(range(n))


def test_round_examples_hold_out_last_event() -> None:
    ex, hold = round_examples({"u": [1, 2]}, {"u": [3, 4, 5]}, max_len=4, holdout=True)
    assert list(hold.targets) == [5] and list(hold.histories[0]) == [1, 2, 3, 4]
    assert 5 not in ex.targets  # held out: never trained on


def test_reservoir_is_bounded_and_deterministic(tmp_path: Path) -> None:
    def run() -> Reservoir:
        r = Reservoir(capacity=50, max_len=4, seed=3)
        for k in range(10):
            x = np.full((40, 4), k, dtype=np.int64)
            r.add(Examples(x, x.copy()))
        return r

    a, b = run(), run()
    assert len(a) == 50 and a.seen == 400
    assert np.array_equal(a.inputs, b.inputs)
    assert len(set(a.inputs[:, 0].tolist())) >= 6  # old rounds keep a share
    a.save(tmp_path)
    c = Reservoir.load(tmp_path)
    assert np.array_equal(c.inputs, a.inputs) and c.seen == 400


def _register(reg: Registry, n_rows: int = 30) -> int:
    model = Recommender(ModelConfig(), n_rows)
    vocab = ItemVocab([f"i{k}" for k in range(n_rows - 1)])

    def write(d: Path) -> None:
        save_weights(model, d / "model.safetensors")
        vocab.save(d / "vocab.json")

    return reg.register(write, {"model_config": ModelConfig().model_dump(), "watermark": {}})


def test_registry_refuses_tampered_and_truncated(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    v1 = _register(reg)
    reg.set_champion(v1, "first")
    v2 = _register(reg)
    weights = reg.path(v2) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryIntegrityError, match="tampered"):
        reg.load(v2)
    with pytest.raises(RegistryIntegrityError):
        reg.set_champion(v2, "should not happen")
    assert reg.champion() == v1
    v3 = _register(reg)
    vocab = reg.path(v3) / "vocab.json"
    vocab.write_bytes(vocab.read_bytes()[:5])
    with pytest.raises(RegistryIntegrityError, match=r"vocab\.json"):
        reg.load(v3)
    assert reg.champion() == v1 and reg.load().version == v1


def test_registry_refuses_a_version_with_a_missing_file(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    v1 = _register(reg)
    (reg.path(v1) / "vocab.json").unlink()  # lost or deleted behind the registry's back
    with pytest.raises(RegistryIntegrityError, match="missing"):
        reg.verify(v1)


def test_registry_keeps_last_k_and_the_champion(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg", keep=3)
    first = _register(reg)
    reg.set_champion(first, "first")
    for _ in range(5):
        _register(reg)
    reg.prune()
    assert reg.versions() == [first, 4, 5, 6]


def test_gate_rejects_a_broken_candidate() -> None:
    torch.manual_seed(0)
    table = synthetic_table(4000, seed=1)
    vocab = ItemVocab(table.column("item_id").to_pylist())
    seqs = user_sequences(table, vocab)
    half = {u: s[: len(s) // 2] for u, s in seqs.items()}
    rest = {u: s[len(s) // 2 :] for u, s in seqs.items()}
    train_ex, _ = round_examples({}, half, 20, holdout=False)
    _, hold = round_examples(half, rest, 20, holdout=True)
    cfg = ModelConfig(max_len=20, d_model=32, dropout=0.1)
    champion = Recommender(cfg, len(vocab))
    fit(champion, train_ex, torch_step(champion, 5e-3), epochs=4, batch_size=64)
    assert evaluate(champion, hold)["ndcg10"] > 0.05  # the champion learned the chains

    broken = Recommender(cfg, len(vocab))
    broken.load_state_dict(champion.state_dict())
    rng = np.random.default_rng(0)
    shuffled = Examples(train_ex.inputs, train_ex.targets.copy())
    mask = shuffled.targets > 0
    shuffled.targets[mask] = rng.permutation(shuffled.targets[mask])  # targets destroyed
    fit(broken, shuffled, torch_step(broken, 5e-3), epochs=4, batch_size=64)
    counts = np.bincount(train_ex.targets.flatten(), minlength=len(vocab))
    result = gate(broken, champion, hold, hold, counts, GateConfig(min_eval_users=10))
    assert not result.promote
    assert "worse on newest events" in result.reason
    ok = gate(champion, champion, hold, hold, counts, GateConfig(min_eval_users=10))
    assert ok.promote  # the same model is never worse than itself


def test_ndcg_values() -> None:
    ndcg, hr = ndcg_hr(torch.tensor([0, 1, 20]), k=10)
    assert hr == pytest.approx(2 / 3)
    assert ndcg == pytest.approx((1.0 + 1 / np.log2(3)) / 3)


def test_next_slice_holdout_asks_each_event_given_everything_before() -> None:
    import pyarrow as pa

    from training.data import next_slice_holdout

    vocab = ItemVocab(["a", "b", "c"])
    before = pa.table({"user_id": ["u1", "u1", "u2"], "item_id": ["a", "b", "c"]})
    new = pa.table({"user_id": ["u1", "u3", "u1", "u3"], "item_id": ["c", "a", "zz", "b"]})
    hold = next_slice_holdout(before, new, vocab, max_len=4, max_cases=10, seed=0)
    # u1: a,b -> c; u1: a,b,c -> zz (unknown: row past the table = a miss); u3: a -> b.
    # u3's first event has no history, so it is no question.
    assert len(hold) == 3
    assert hold.histories.tolist() == [[0, 0, 1, 2], [0, 1, 2, 3], [0, 0, 0, 1]]
    assert hold.targets.tolist() == [3, len(vocab), 2]
    assert hold.seen == [{1, 2}, {1, 2, 3}, {1}]
    model = Recommender(ModelConfig(max_len=4, d_model=16), len(vocab))
    assert evaluate(model, hold)["n"] == 3  # the unknown target is scored as a miss, not an error
    capped = next_slice_holdout(before, new, vocab, max_len=4, max_cases=2, seed=0)
    assert len(capped) <= 2
    # Which event each question asks and who asked it, by position in the slice: a model that
    # knows fewer items is asked fewer questions, and the rest pair up with the first model's.
    assert hold.asked is not None and hold.users is not None
    assert hold.asked.tolist() == [0, 2, 3] and hold.users.tolist() == [0, 0, 1]
    older = next_slice_holdout(before, new, ItemVocab(["c"]), max_len=4, max_cases=10, seed=0)
    assert older.asked is not None and older.users is not None
    assert older.asked.tolist() == [2] and older.users.tolist() == [0]  # u1 knew only c


def test_heldout_questions_round_trip_through_a_reservoir(tmp_path: Path) -> None:
    from training.data import Holdout, holdout_as_examples, holdout_from_examples

    hold = Holdout(np.array([[0, 1, 2], [3, 1, 2]]), np.array([3, 4]), [{1, 2}, {1, 2, 3}])
    pool = Reservoir(capacity=10, max_len=3)
    pool.add(holdout_as_examples(hold))
    pool.save(tmp_path, name="replay_eval")
    back = holdout_from_examples(Examples(*_arrays(Reservoir.load(tmp_path, name="replay_eval"))))
    assert back.histories.tolist() == hold.histories.tolist()
    assert back.targets.tolist() == [3, 4] and back.seen == hold.seen


def _arrays(r: Reservoir) -> tuple[np.ndarray, np.ndarray]:
    return r.inputs, r.targets
