"""pserv.torch against plain torch: ShardedEmbedding's forward and gradients against
torch.nn.Embedding, duplicate ids, hashed ids, the key layout, ShardedParameters, and
the CTR example reaching a held-out logloss well below the constant predictor's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pserv

try:
    import torch
except ImportError:
    # CI (PSERV_PYTHON_TESTS=require) must run these: a missing torch fails there.
    if os.environ.get("PSERV_PYTHON_TESTS") == "require":
        raise
    pytest.skip("torch is not installed (pip install torch; scripts/test installs it)",
                allow_module_level=True)

from pserv.torch import FUNC_ASSIGN, ShardedEmbedding, ShardedParameters, hash_ids

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ctr.py"


def splitmix_bucket(i: int, buckets: int, seed: int = 0) -> int:
    """The documented hash in plain Python ints: splitmix64(id ^ seed) mod buckets."""
    m = (1 << 64) - 1
    x = (((i & m) ^ seed) + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return (x ^ (x >> 31)) % buckets


@pytest.mark.parametrize("value_len", [4, 1], ids=["key-per-row", "key-per-value"])
def test_matches_nn_embedding_under_server_sgd(make_cluster, value_len):
    """Same init, same batches, servers' sgd:0.1 vs torch.optim.SGD(lr=0.1): the same
    outputs at every step and the same table after them. No flush between steps: every
    forward reads the previous step's update."""
    dim, rows, lr = 4, 40, 0.1
    c = make_cluster(servers=2, workers=1, value_len=value_len, update=f"sgd:{lr}")
    w = c.worker(0)
    torch.manual_seed(7)
    ref = torch.nn.Embedding(rows, dim)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    emb = ShardedEmbedding(rows, dim, worker=w, key_offset=1000)
    emb.assign_(ref.weight.detach())
    torch.testing.assert_close(emb.weight(), ref.weight.detach())
    g = torch.Generator().manual_seed(3)
    for step in range(5):
        ids = torch.randint(0, rows, (6, 7), generator=g)     # with duplicates
        target = torch.randn(6, 7, dim, generator=g)
        out = emb(ids)
        expect = ref(ids)
        assert out.shape == (6, 7, dim) and out.requires_grad
        torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6)
        ((out - target) ** 2).sum().backward()
        opt.zero_grad()
        ((expect - target) ** 2).sum().backward()
        opt.step()
    emb.flush()
    torch.testing.assert_close(emb.weight(), ref.weight.detach(), rtol=1e-5, atol=1e-5)
    assert list(emb.parameters()) == []     # nothing for a local optimizer
    w.finish()


def test_duplicate_ids_gradients_summed(make_cluster):
    """With the "sum" rule and a zero table, the table after one backward is the
    gradient itself: the sum over every occurrence of an id, as nn.Embedding's grad."""
    dim, rows = 3, 10
    c = make_cluster(servers=2, workers=1, value_len=dim, update="sum")
    w = c.worker(0)
    emb = ShardedEmbedding(rows, dim, worker=w)
    ref = torch.nn.Embedding(rows, dim)
    torch.nn.init.zeros_(ref.weight)
    ids = torch.tensor([[1, 1, 1], [2, 1, 9], [9, 9, 2]])
    upstream = torch.randn(3, 3, dim, generator=torch.Generator().manual_seed(5))
    (emb(ids) * upstream).sum().backward()
    (ref(ids) * upstream).sum().backward()
    emb.flush()
    got = emb.weight()
    torch.testing.assert_close(got, ref.weight.grad)
    # Row 1 by hand: its four occurrences.
    by_hand = upstream[0, 0] + upstream[0, 1] + upstream[0, 2] + upstream[1, 1]
    torch.testing.assert_close(got[1], by_hand)
    assert torch.count_nonzero(got.abs().sum(1)).item() == 3     # rows 1, 2, 9 only
    w.finish()


def test_key_layout(make_cluster):
    """value_len == 1: key key_offset + row * dim + j holds (row, j); value_len == dim:
    key key_offset + row holds the row."""
    rows, dim, off = 5, 3, 77
    weight = torch.arange(rows * dim, dtype=torch.float32).view(rows, dim) + 1
    c = make_cluster(servers=2, workers=1, value_len=1, update="sum")
    w = c.worker(0)
    emb = ShardedEmbedding(rows, dim, worker=w, key_offset=off)
    assert emb.key_range == (off, off + rows * dim) and emb.keys_per_row == dim
    emb.assign_(weight)
    keys = np.array([off + 2 * dim, off + 4 * dim + 2], np.uint64)
    np.testing.assert_array_equal(w.wait_pull(w.pull(keys)), [weight[2, 0], weight[4, 2]])
    w.finish()
    c2 = make_cluster(servers=2, workers=1, value_len=dim, update="sum")
    w2 = c2.worker(0)
    emb2 = ShardedEmbedding(rows, dim, worker=w2, key_offset=off)
    assert emb2.key_range == (off, off + rows) and emb2.keys_per_row == 1
    emb2.assign_(weight)
    got = w2.wait_pull(w2.pull(np.array([off + 3], np.uint64)))
    np.testing.assert_array_equal(got, weight[3].numpy())
    with pytest.raises(ValueError, match="value_len"):
        ShardedEmbedding(rows, 2, worker=w2)
    with pytest.raises(IndexError):
        emb2(torch.tensor([rows]))
    with pytest.raises(IndexError):
        emb2(torch.tensor([-1]))
    with pytest.raises(ValueError, match="key space"):
        ShardedEmbedding(2**63, dim, worker=w2, key_offset=2**63)
    w2.finish()


def test_hashed_ids(make_cluster):
    """hashed=True: any int64 id maps to splitmix64(id) mod num_features; ids whose hashes
    collide share a row, and their gradients add up there."""
    buckets, dim = 16, 2
    ids_list = [0, 1, 17, 2**40 + 3, -5, 2**63 - 1, 123456789]
    for seed in (0, 99):
        np.testing.assert_array_equal(
            hash_ids(np.array(ids_list), buckets, seed),
            [splitmix_bucket(i, buckets, seed) for i in ids_list])
    c = make_cluster(servers=2, workers=1, value_len=dim, update="sum")
    w = c.worker(0)
    emb = ShardedEmbedding(buckets, dim, worker=w, hashed=True)
    init = torch.randn(buckets, dim, generator=torch.Generator().manual_seed(1))
    emb.assign_(init)
    ids = torch.tensor(ids_list)
    rows = emb.rows_of(ids)
    assert rows.min() >= 0 and rows.max() < buckets
    out = emb(ids)
    torch.testing.assert_close(out, init[rows])
    # Two different ids in one bucket: one row gets both gradients.
    first = {}
    a = b = None
    for i in range(1000):
        r = splitmix_bucket(i, buckets)
        if r in first:
            a, b = first[r], i
            break
        first[r] = i
    assert a is not None
    pair = torch.tensor([a, b])
    emb(pair).sum().backward()
    emb.flush()
    row = splitmix_bucket(a, buckets)
    torch.testing.assert_close(emb.weight()[row], init[row] + 2.0)
    w.finish()


def test_sharded_parameters_follow_server_sgd(make_cluster):
    """A dense Linear in a server range: init_ from the local values, and push_grads
    under sgd:0.5 gives what torch.optim.SGD(lr=0.5) does."""
    c = make_cluster(servers=2, workers=1, value_len=4, update="sgd:0.5")
    w = c.worker(0)
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3)                        # 18 values: 5 keys, the last padded
    ref = torch.nn.Linear(5, 3)
    ref.load_state_dict(lin.state_dict())
    dense = ShardedParameters(lin.parameters(), worker=w, key_offset=10)
    assert dense.key_range == (10, 15) and dense.numel == 18
    dense.init_()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        dense.pull()
        lin.zero_grad()
        lin(x).pow(2).mean().backward()
        dense.push_grads()
        opt.zero_grad()
        ref(x).pow(2).mean().backward()
        opt.step()
    dense.pull()
    for p, q in zip(lin.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # The padding after the 18 values stayed untouched.
    assert w.wait_pull(w.pull_range(14, 15))[2:].tolist() == [0.0, 0.0]
    w.finish()


def test_init_normal_two_workers(make_cluster):
    """init_normal_ is collective: worker 0 assigns, both see the same table after it."""
    c = make_cluster(servers=2, workers=2, value_len=1, update="adagrad:0.1")
    ws = c.connect_workers()
    tables = [None, None]

    import threading

    def body(w):
        emb = ShardedEmbedding(50, 3, worker=w)
        emb.init_normal_(std=0.5, seed=4)
        tables[w.rank] = emb.weight()

    ts = [threading.Thread(target=body, args=(w,)) for w in ws]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts)
    assert tables[0] is not None and tables[1] is not None
    torch.testing.assert_close(tables[0], tables[1])
    std = tables[0].std().item()
    assert 0.35 < std < 0.65, std
    assert FUNC_ASSIGN == 1
    for w in ws:
        w.finish()


@pytest.mark.timeout(300)
def test_ctr_example_beats_constant_predictor(tmp_path):
    """Two worker processes on synthetic data: the held-out logloss reaches a level
    clearly below the constant predictor's, and the AUC is well above 0.5."""
    out = tmp_path / "ctr.json"
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--epochs", "3", "--rows", "12000", "--workers", "2",
         "--timeout", "60", "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert [e["epoch"] for e in res["epochs"]] == [1, 2, 3]
    assert proc.stdout.count("held-out logloss") == 4, proc.stdout   # header + 3 epochs
    best = min(e["logloss"] for e in res["epochs"])
    assert best < res["constant_logloss"] - 0.08, res
    assert res["epochs"][-1]["auc"] > 0.75, res
    # The hidden model is the floor no learner beats by much.
    assert best > res["hidden_model_logloss"] - 0.05, res


def load_example():
    """The example as a module (its functions only; nothing runs on import)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ctr_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_auc_logloss_and_libsvm_reader(tmp_path):
    """The example's AUC against counting every (positive, negative) pair (ties half),
    its logloss against the formula, and its libsvm reader on a small file."""
    ctr = load_example()
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(np.float32)
    score = np.round(rng.random(300) + 0.5 * y, 1)           # rounded: many ties
    pos, neg = score[y > 0], score[y == 0]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert ctr.auc(y, score) == pytest.approx(pairs / (len(pos) * len(neg)), abs=1e-12)
    assert ctr.auc(y, -score) == pytest.approx(1 - pairs / (len(pos) * len(neg)), abs=1e-12)
    p = np.clip(score / 2, 0.01, 0.99)
    assert ctr.logloss(y, p) == pytest.approx(
        float(np.mean([-np.log(q) if t else -np.log(1 - q) for t, q in zip(y, p)])))
    f = tmp_path / "small.libsvm"
    f.write_text("1 3:0.5 7:2\n-1 2:1\n\n0 1:0.25 2:0.5 9:1\n")
    (ids, vals, labels), n = ctr.libsvm(str(f))
    assert n == 10
    np.testing.assert_array_equal(labels, [1, 0, 0])
    np.testing.assert_array_equal(ids, [[3, 7, 0], [2, 0, 0], [1, 2, 9]])
    np.testing.assert_array_equal(vals, [[0.5, 2, 0], [1, 0, 0], [0.25, 0.5, 1]])
