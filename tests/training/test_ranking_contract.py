"""The ranking contract every scorer kind obeys (``training.ranking`` is the one core).

Two scorer kinds exist: row scorers (a ``Recommender``: what the gate, ``streamtune eval`` and the
demo measure through ``training.metrics``) and catalog scorers (``training.evaluation.Scorer``:
what ``bench.quality`` measures). Each kind is checked with a NaN, a constant, an oracle and a
real model; the gate must reject the broken ones, and the gate's NDCG must equal bench.quality's
on the same questions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from tests.training.data_gen import synthetic_table
from training.config import GateConfig, ModelConfig
from training.data import Examples, Holdout, round_examples, user_sequences
from training.evaluation import (
    Case,
    ModelScorer,
    PopularityScorer,
    encode,
    evaluate_cases,
)
from training.fit import fit, torch_step
from training.gate import gate
from training.metrics import evaluate, popularity_ndcg
from training.model import Recommender
from training.ranking import (
    MISS_RANK,
    ndcg_hr,
    popularity_ranks,
    rank_full,
    rank_sampled,
    top_k,
)
from training.vocab import ItemVocab

CFG = ModelConfig(max_len=20, d_model=32, dropout=0.1, text_init=False)
GATE = GateConfig(min_eval_users=10)


# -- the core's rules on hand-made scores ----------------------------------------------------
def test_ties_and_non_finite_scores_count_against_the_model() -> None:
    s = np.array(
        [
            [-np.inf, 1.0, 1.0, 1.0, 1.0],  # constant: the target ties with all 3 others
            [-np.inf, np.nan, np.nan, np.nan, np.nan],  # NaN model: the target is a miss
            [-np.inf, 0.5, np.nan, 0.1, 0.2],  # a NaN competitor beats a finite target
            [-np.inf, 3.0, 2.0, np.inf, 1.0],  # +inf competitor beats; target 2.0 -> rank 2
            [-np.inf, 3.0, -np.inf, 1.0, 0.0],  # a target marked -inf (cannot score) misses
        ]
    )
    ranks = rank_full(s, np.array([1, 1, 1, 2, 2]), None)
    assert ranks.tolist() == [3, MISS_RANK, 1, 2, MISS_RANK]


def test_seen_items_are_excluded_but_the_target_competes_and_unknown_targets_miss() -> None:
    s = np.array([[-np.inf, 5.0, 4.0, 3.0, 2.0]] * 3)
    # row 0: items 1 and 2 seen (excluded), target 3 ranks first among {3, 4};
    # row 1: the target 1 was seen before and still competes; row 2: target 7 is unknown.
    ranks = rank_full(s, np.array([3, 1, 7]), [[1, 2], [1, 2], []])
    assert ranks.tolist() == [0, 0, MISS_RANK]
    sampled = rank_sampled(s, np.array([4, 3, 0]), np.array([[1, 2], [4, 4], [1, 2]]))
    assert sampled.tolist() == [2, 0, MISS_RANK]  # padding is never a valid target


def test_popularity_ranks_are_rank_full_over_broadcast_counts() -> None:
    """The gate's popularity reference ranks without a [questions, catalog] matrix; ties, seen
    targets, repeated and unknown seen items, padding and unknown targets as ``rank_full``."""
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 6, size=40).astype(float)  # many ties
    targets = np.concatenate([rng.integers(1, 40, size=50), [0, 45]])
    seen = [list(rng.integers(0, 50, size=rng.integers(0, 12))) + [t] * (i % 2)
            for i, t in enumerate(targets)]  # fmt: skip
    full = rank_full(np.broadcast_to(counts, (len(targets), 40)), targets, seen)
    assert popularity_ranks(counts, targets, seen).tolist() == full.tolist()


@pytest.mark.parametrize("cells", [1 << 23, 3 * 7])  # one scratch table; 3 rows at a time
def test_once_each_keeps_one_of_each_pair(cells: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.ranking as ranking

    monkeypatch.setattr(ranking, "SCORE_CELLS", cells)
    rng = np.random.default_rng(1)
    rows = np.sort(rng.integers(2, 30, size=400))
    cols = rng.integers(0, 7, size=400)
    keep = ranking.once_each(rows, cols, 7)
    pairs = list(zip(rows.tolist(), cols.tolist(), strict=True))
    kept = [p for p, k in zip(pairs, keep.tolist(), strict=True) if k]
    assert sorted(kept) == sorted(set(pairs))  # every pair once, none twice


def test_ndcg_of_constant_and_nan_scores_is_zero_and_of_top_rank_one() -> None:
    assert ndcg_hr(np.array([MISS_RANK, MISS_RANK]))[0] == 0.0
    assert ndcg_hr(np.array([0, 0])) == (1.0, 1.0)
    assert ndcg_hr(np.zeros(0)) == (0.0, 0.0)


def test_top_k_never_picks_padding_excluded_or_non_finite() -> None:
    s = torch.tensor([9.0, float("nan"), 1.0, float("inf"), 3.0, float("-inf"), 2.0])
    assert top_k(s, 3).tolist() == [4, 6, 2]
    assert top_k(s, 3, exclude=[4]).tolist() == [6, 2]
    assert top_k(s.numpy(), 10, exclude=[2, 99]).tolist() == [4, 6]
    assert top_k(torch.full((5,), float("nan")), 3).tolist() == []


# -- scorer kinds --------------------------------------------------------------------------
@dataclass
class World:
    vocab: ItemVocab
    hold: Holdout
    cases: list[Case]
    n_items: int
    item_ids: list[str]
    train_ex: Examples
    counts: np.ndarray
    champion: Recommender


@pytest.fixture(scope="module")
def world() -> World:
    torch.manual_seed(0)
    table = synthetic_table(3000, seed=1)
    inter = encode(table)
    vocab = ItemVocab(table.column("item_id").to_pylist())
    assert inter.item_ids == vocab.items()  # catalog codes == vocab rows: same questions
    seqs = user_sequences(table, vocab)
    half = {u: s[: len(s) // 2] for u, s in seqs.items()}
    train_ex, _ = round_examples({}, half, CFG.max_len, holdout=False)
    # One question per user: the last event given everything before it (never trained on).
    _, hold = round_examples({}, seqs, CFG.max_len, holdout=True)
    cases = [Case(n, np.asarray(s[:-1]), s[-1]) for n, s in enumerate(seqs.values()) if len(s) > 1]
    assert [c.target for c in cases] == hold.targets.tolist()
    champion = Recommender(CFG, len(vocab))
    fit(champion, train_ex, torch_step(champion, 5e-3), epochs=4, batch_size=64)
    counts = np.bincount(train_ex.targets.flatten(), minlength=len(vocab)).astype(np.float64)
    counts[0] = 0
    return World(vocab, hold, cases, inter.n_items, inter.item_ids, train_ex, counts, champion)


def _nan_model(n_rows: int) -> Recommender:
    m = Recommender(CFG, n_rows)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float("nan"))
    return m


def _constant_model(n_rows: int) -> Recommender:
    m = Recommender(CFG, n_rows)
    with torch.no_grad():
        m.item_embeddings().zero_()  # every item scores h . 0 = 0: a collapsed model
    return m


class OracleRows:
    """A row scorer that knows the answers: question i's target scores 1, all else 0."""

    def __init__(self, targets: np.ndarray, n_rows: int) -> None:
        self.targets, self.n_rows, self.at = targets, n_rows, 0

    def eval(self) -> OracleRows:
        return self

    def score(self, inputs: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(inputs), self.n_rows)
        t = torch.from_numpy(self.targets[self.at : self.at + len(inputs)])
        out[torch.arange(len(inputs)), t] = 1.0
        self.at += len(inputs)
        return out


class CatalogScorer:
    """Catalog scorers for bench.quality's path: NaN, constant, or the oracle."""

    def __init__(self, kind: str, cases: Sequence[Case], n_items: int) -> None:
        self.kind, self.targets, self.n, self.at = kind, [c.target for c in cases], n_items, 0

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        b = len(histories)
        if self.kind == "nan":
            return np.full((b, self.n + 1), np.nan, dtype=np.float32)
        out = np.zeros((b, self.n + 1), dtype=np.float32)
        if self.kind == "oracle":
            out[np.arange(b), self.targets[self.at : self.at + b]] = 1.0
            self.at += b
        return out


def _bench_metrics(scorer: object, w: World) -> tuple[float, float]:
    m = evaluate_cases(
        scorer,  # type: ignore[arg-type]
        w.cases,
        w.n_items,
        [np.append(c.history, c.target) for c in w.cases],
        seed=0,
        negatives=50,
    )
    return m.ndcg10_full, m.ndcg10_sampled


@pytest.mark.parametrize("kind", ["nan", "constant"])
def test_degenerate_row_scorers_score_zero_and_the_gate_rejects_them(
    world: World, kind: str
) -> None:
    broken = (_nan_model if kind == "nan" else _constant_model)(len(world.vocab))
    assert evaluate(broken, world.hold)["ndcg10"] < 0.01
    first = gate(broken, None, world.hold, world.hold, world.counts, GATE)
    assert not first.promote, first.reason  # loses to popularity as a first version
    vs_champ = gate(broken, world.champion, world.hold, world.hold, world.counts, GATE)
    assert not vs_champ.promote and "worse on newest events" in vs_champ.reason
    assert vs_champ.metrics["cand_new_ndcg10"] < 0.01


@pytest.mark.parametrize("kind", ["nan", "constant"])
def test_degenerate_catalog_scorers_score_zero(world: World, kind: str) -> None:
    full, sampled = _bench_metrics(CatalogScorer(kind, world.cases, world.n_items), world)
    assert full < 0.01 and sampled < 0.01


def test_oracle_scores_one_in_every_path(world: World) -> None:
    n = len(world.vocab)
    assert evaluate(OracleRows(world.hold.targets, n), world.hold)["ndcg10"] == 1.0
    full, sampled = _bench_metrics(CatalogScorer("oracle", world.cases, world.n_items), world)
    assert full == 1.0 and sampled == 1.0
    oracle = OracleRows(np.tile(world.hold.targets, 4), n)  # the gate asks the questions twice
    assert gate(oracle, world.champion, world.hold, world.hold, world.counts, GATE).promote


def test_shuffled_target_model_is_rejected(world: World) -> None:
    broken = Recommender.from_state(CFG, world.champion.state_dict())
    rng = np.random.default_rng(0)
    shuffled = Examples(world.train_ex.inputs, world.train_ex.targets.copy())
    mask = shuffled.targets > 0
    shuffled.targets[mask] = rng.permutation(shuffled.targets[mask])  # targets destroyed
    fit(broken, shuffled, torch_step(broken, 5e-3), epochs=4, batch_size=64)
    result = gate(broken, world.champion, world.hold, world.hold, world.counts, GATE)
    assert not result.promote and "worse on newest events" in result.reason


@pytest.mark.parametrize("kind", ["trained", "nan", "constant"])
def test_gate_and_bench_quality_give_the_same_ndcg(world: World, kind: str) -> None:
    n = len(world.vocab)
    model = {"trained": world.champion, "nan": _nan_model(n), "constant": _constant_model(n)}[kind]
    gated = gate(model, None, world.hold, world.hold, world.counts, GATE)
    bench = evaluate_cases(
        ModelScorer(model, world.vocab, world.item_ids),
        world.cases,
        world.n_items,
        [np.append(c.history, c.target) for c in world.cases],
        negatives=50,
    )
    assert gated.metrics["cand_new_ndcg10"] == pytest.approx(bench.ndcg10_full, abs=1e-12)
    if kind == "trained":
        assert bench.ndcg10_full > 0.05  # a real model, not two zeros agreeing
    pop = PopularityScorer(world.train_ex.targets[world.train_ex.targets > 0], world.n_items)
    pop_bench = evaluate_cases(pop, world.cases, world.n_items, [c.history for c in world.cases])
    assert popularity_ndcg(world.counts, world.hold) == pytest.approx(
        pop_bench.ndcg10_full, abs=1e-12
    )


def test_top_k_rows_is_top_k_of_each_row() -> None:
    """The batch form serving uses picks what ``top_k`` picks, row by row."""
    from training.ranking import top_k_rows

    rng = np.random.default_rng(3)
    s = torch.from_numpy(rng.permutation(8 * 30).reshape(8, 30).astype(np.float32))
    s[1, 4], s[2, 7], s[3, :] = float("nan"), float("inf"), float("nan")
    exclude = [None, [1, 2, 99], [], [5], None, list(range(25)), [-1, 3], [29]]
    got = top_k_rows(s, 7, exclude)
    for row, ex, picked in zip(s, exclude, got, strict=True):
        assert picked.tolist() == top_k(row, 7, exclude=ex).tolist()
        ok = [c for c in range(1, 30) if c not in (ex or []) and bool(torch.isfinite(row[c]))]
        assert picked.tolist() == sorted(ok, key=lambda c: -float(row[c]))[:7]
    assert got[3].tolist() == [] and len(got[5]) == 5


def test_full_rankings_cut_by_the_cell_bound_rank_the_same(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1M-item catalog scores a few questions a batch (``SCORE_CELLS``); the ranks must not
    depend on where the batches are cut."""
    import training.ranking as ranking

    scorer = ModelScorer(world.champion, world.vocab, world.item_ids)
    negatives = [np.append(c.history, c.target) for c in world.cases]
    whole = evaluate(world.champion, world.hold)
    cases_whole = evaluate_cases(scorer, world.cases, world.n_items, negatives, negatives=50)
    calls = []
    score = world.champion.score
    monkeypatch.setattr(world.champion, "score", lambda x: calls.append(len(x)) or score(x))
    monkeypatch.setattr(ranking, "SCORE_CELLS", 7 * (world.n_items + 1))  # 7 questions a batch
    assert evaluate(world.champion, world.hold) == whole
    assert evaluate_cases(scorer, world.cases, world.n_items, negatives, negatives=50) == (
        cases_whole
    )
    assert max(calls) == 7 and len(calls) > 2 * len(world.cases) / 7  # cut, in both paths
