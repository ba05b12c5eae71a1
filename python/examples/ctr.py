"""Click-through-rate prediction with pserv and PyTorch: a factorisation machine with a
small deep part (DeepFM-like), trained by worker processes against a pserv.LocalCluster.

The sparse part (a weight and a ``--dim`` vector per feature) is two
``pserv.torch.ShardedEmbedding`` tables; the dense part (an MLP over the pooled embeddings
and the FM interaction vector, and the bias) is a ``pserv.torch.ShardedParameters``
range. Everything lives on the servers, which apply the update rule (``--update``,
AdaGrad by default) to the gradients every worker pushes, asynchronously (each worker
reads the servers' current values at every step). After every epoch worker 0 prints the
held-out logloss and AUC, next to the constant predictor's logloss (the training base
rate) and, on synthetic data, the logloss of the hidden model that drew the labels.

Data (``--data``):

- ``synthetic`` (default): ``--rows`` examples of ``--fields`` categorical fields of
  ``--vocab`` values each (Zipf-distributed), labels drawn from a hidden FM with random
  weights; all from ``--seed``.
- a libsvm file (``label index:value ...``; a label > 0 is a click, 0 or -1 is not), for
  example the UCI digits set ``scripts/real-data`` writes (target/data/digits.libsvm:
  label = digit >= 5) or ``scripts/real-data target/data/breast_cancer.libsvm
  breast_cancer``.

Run (from the repository root, after ``cargo build --release`` and ``pip install
./python`` plus ``pip install torch``)::

    python python/examples/ctr.py --epochs 5
    python python/examples/ctr.py --data target/data/digits.libsvm --epochs 10 --dim 8
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

Data = Tuple[np.ndarray, np.ndarray, np.ndarray]  # ids [N, L] int64, vals [N, L] f32, y [N] f32


# ---------------------------------------------------------------------------- data
def synthetic(rows: int, fields: int, vocab: int, seed: int) -> Tuple[Data, int, np.ndarray]:
    """A CTR set drawn from a hidden factorisation machine; also the true click
    probabilities (for the hidden model's own logloss). Feature id of value ``v`` of field
    ``f``: ``f * vocab + v``."""
    rng = np.random.default_rng(seed)
    k = 4
    n = fields * vocab
    w_true = rng.normal(0.0, 0.4, n)
    v_true = rng.normal(0.0, 0.6, (n, k))
    zipf = 1.0 / np.arange(1, vocab + 1) ** 1.1
    zipf /= zipf.sum()
    ids = np.stack([f * vocab + rng.choice(vocab, rows, p=zipf) for f in range(fields)], 1)
    vs = v_true[ids]                                        # rows, fields, k
    s = vs.sum(1)
    pair = 0.5 * ((s * s).sum(1) - (vs * vs).sum((1, 2)))
    logit = -1.0 + w_true[ids].sum(1) + pair
    p = 1.0 / (1.0 + np.exp(-logit))
    y = (rng.random(rows) < p).astype(np.float32)
    return (ids.astype(np.int64), np.ones(ids.shape, np.float32), y), n, p


def libsvm(path: str) -> Tuple[Data, int]:
    """Read a libsvm file; rows padded to the longest with feature 0 at value 0 (which
    adds nothing to a prediction nor gets a gradient)."""
    labels: List[float] = []
    rows: List[List[Tuple[int, float]]] = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            labels.append(1.0 if float(parts[0]) > 0 else 0.0)
            rows.append([(int(i), float(v)) for i, v in (p.split(":", 1) for p in parts[1:])])
    if not rows:
        raise SystemExit(f"{path}: no examples")
    width = max(1, max(len(r) for r in rows))
    ids = np.zeros((len(rows), width), np.int64)
    vals = np.zeros((len(rows), width), np.float32)
    for i, r in enumerate(rows):
        if r:
            ids[i, :len(r)] = [a for a, _ in r]
            vals[i, :len(r)] = [b for _, b in r]
    return (ids, vals, np.array(labels, np.float32)), int(ids.max()) + 1


def split(data: Tuple[np.ndarray, ...], test_frac: float,
          seed: int) -> Tuple[Tuple[np.ndarray, ...], Tuple[np.ndarray, ...]]:
    """A seeded shuffle of the rows of every array (all of one length), then the last
    ``test_frac`` of it held out."""
    order = np.random.default_rng(seed + 1).permutation(len(data[-1]))
    cut = len(order) - max(1, int(round(len(order) * test_frac)))
    tr, te = order[:cut], order[cut:]
    return tuple(a[tr] for a in data), tuple(a[te] for a in data)


# ---------------------------------------------------------------------------- metrics
def logloss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities ``p`` (clipped to [1e-7, 1 - 1e-7])."""
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney U statistic, ties counted half."""
    y = np.asarray(y) > 0.5
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    uniq, inv, counts = np.unique(score, return_inverse=True, return_counts=True)
    # Average 1-based rank of each distinct score.
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0
    ranks = avg_rank[inv.reshape(-1)]
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


# ---------------------------------------------------------------------------- model
def make_model(num_features: int, dim: int, hidden: int, worker, hash_buckets: int):
    """The DeepFM-like model and its dense part on the servers. Keys (value_len 1):
    the weights [0, R), the vectors [R, R + R * dim) row-major, then the dense range."""
    import torch
    from pserv.torch import ShardedEmbedding, ShardedParameters

    rows = hash_buckets or num_features
    hashed = hash_buckets > 0

    class DeepFM(torch.nn.Module):
        """logit = bias + sum_i x_i w_i + FM(x, v) + MLP([sum_i x_i v_i, FM vector])."""

        def __init__(self) -> None:
            super().__init__()
            self.wide = ShardedEmbedding(rows, 1, worker=worker, hashed=hashed)
            self.emb = ShardedEmbedding(rows, dim, worker=worker, hashed=hashed,
                                        key_offset=self.wide.key_range[1])
            self.deep = torch.nn.Sequential(
                torch.nn.Linear(2 * dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
            self.bias = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
            x = vals.unsqueeze(-1)
            v = self.emb(ids) * x                               # B, L, dim
            s = v.sum(1)
            fm = 0.5 * (s * s - (v * v).sum(1))                 # B, dim
            linear = (self.wide(ids).squeeze(-1) * vals).sum(1)
            deep = self.deep(torch.cat([s, fm], 1)).squeeze(-1)
            return self.bias + linear + fm.sum(1) + deep

        def flush(self) -> None:
            self.wide.flush()
            self.emb.flush()

    model = DeepFM()
    dense = ShardedParameters(model.parameters(), worker=worker,
                              key_offset=model.emb.key_range[1])
    return model, dense


def predict(model, dense, data: Data, batch: int = 4096) -> np.ndarray:
    """Click probabilities of ``data`` with the servers' current weights."""
    import torch

    dense.pull()
    out = []
    with torch.no_grad():
        for b in range(0, len(data[2]), batch):
            ids = torch.from_numpy(data[0][b:b + batch])
            vals = torch.from_numpy(data[1][b:b + batch])
            out.append(torch.sigmoid(model(ids, vals)).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def worker_main(rank: int, scheduler: str, secret_file: str, cfg: Dict, train: Data, test: Data,
                results: "mp.Queue") -> None:
    """One worker process: train on shard ``rank`` of ``train``; worker 0 evaluates after
    every epoch and sends the figures to ``results``."""
    import torch
    import pserv

    torch.set_num_threads(1)
    torch.manual_seed(cfg["seed"])                  # the same dense init on every worker
    w = pserv.Worker(scheduler, rank, timeout=cfg["timeout"], secret_file=secret_file)
    try:
        model, dense = make_model(cfg["num_features"], cfg["dim"], cfg["hidden"], w,
                                  cfg["hash_buckets"])
        model.emb.init_normal_(std=cfg["init_std"], seed=cfg["seed"])  # collective
        dense.init_()                                                   # collective
        shard = [a[rank::cfg["workers"]] for a in train]
        n = len(shard[2])
        bce = torch.nn.BCEWithLogitsLoss()
        seen = 0
        for epoch in range(1, cfg["epochs"] + 1):
            t0 = time.monotonic()
            order = np.random.default_rng([cfg["seed"], epoch, rank]).permutation(n)
            losses = []
            for b in range(0, n, cfg["batch"]):
                idx = order[b:b + cfg["batch"]]
                ids = torch.from_numpy(shard[0][idx])
                vals = torch.from_numpy(shard[1][idx])
                y = torch.from_numpy(shard[2][idx])
                dense.pull()
                model.zero_grad(set_to_none=True)
                loss = bce(model(ids, vals), y)
                loss.backward()                 # embedding gradients pushed here
                dense.push_grads()
                losses.append(loss.item())
                seen += len(idx)
            model.flush()
            w.barrier()                         # every worker finished the epoch
            if rank == 0:
                p = predict(model, dense, test)
                results.put({"epoch": epoch, "train_logloss": float(np.mean(losses)),
                             "logloss": logloss(test[2], p), "auc": auc(test[2], p),
                             "seconds": time.monotonic() - t0})
            w.barrier()                         # the next epoch starts after the evaluation
        w.finish(seen)
    finally:
        w.close()


# ---------------------------------------------------------------------------- main
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", default="synthetic", help="'synthetic' or a libsvm file")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--dim", type=int, default=8, help="embedding dimension")
    ap.add_argument("--hidden", type=int, default=16, help="hidden units of the deep part")
    ap.add_argument("--batch", type=int, default=128, help="examples per step and worker")
    ap.add_argument("--update", default="adagrad:0.05", help="the servers' update rule")
    ap.add_argument("--workers", type=int, default=2, help="worker processes")
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=20000, help="synthetic: examples")
    ap.add_argument("--fields", type=int, default=8, help="synthetic: fields")
    ap.add_argument("--vocab", type=int, default=100, help="synthetic: values per field")
    ap.add_argument("--hash-buckets", type=int, default=0,
                    help="hash feature ids into this many rows (0: one row per feature)")
    ap.add_argument("--init-std", type=float, default=0.05, help="std of the vectors' init")
    ap.add_argument("--test-frac", type=float, default=0.2, help="held-out fraction")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds a worker's wait or barrier may block")
    ap.add_argument("--json", help="write the per-epoch figures to this file")
    a = ap.parse_args(argv)
    for name in ("epochs", "dim", "hidden", "batch", "workers", "servers", "rows",
                 "fields", "vocab"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0.0 < a.test_frac < 1.0:
        ap.error("--test-frac must be in (0, 1)")
    return a


def main(argv: Optional[List[str]] = None) -> int:
    """Run the example; returns the exit status."""
    import pserv

    args = parse_args(argv)
    bayes = None
    if args.data == "synthetic":
        data, num_features, p_true = synthetic(args.rows, args.fields, args.vocab, args.seed)
        what = f"synthetic: {args.rows} rows, {args.fields} fields x {args.vocab} values"
    else:
        data, num_features = libsvm(args.data)
        p_true = None
        what = f"{args.data}: {len(data[2])} rows, {num_features} features"
    train, test = split(data, args.test_frac, args.seed)
    if p_true is not None:
        (_,), (p_test,) = split((p_true,), args.test_frac, args.seed)
        bayes = logloss(test[2], p_test)
    rate = float(train[2].mean())
    constant = logloss(test[2], np.full(len(test[2]), rate))
    print(f"{what}; {len(train[2])} train / {len(test[2])} held out, click rate {rate:.3f}")
    print(f"held-out logloss of the constant predictor {constant:.4f}"
          + (f", of the hidden model {bayes:.4f}" if bayes is not None else ""))
    cfg = dict(num_features=num_features, dim=args.dim, hidden=args.hidden,
               batch=args.batch, epochs=args.epochs, workers=args.workers, seed=args.seed,
               hash_buckets=args.hash_buckets, init_std=args.init_std, timeout=args.timeout)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    epochs: List[Dict] = []
    with pserv.LocalCluster(servers=args.servers, workers=args.workers, value_len=1,
                            update=args.update, timeout=args.timeout) as cluster:
        procs = [ctx.Process(target=worker_main, name=f"worker {r}",
                             args=(r, cluster.scheduler, cluster.secret_file, cfg, train, test,
                                   results))
                 for r in range(args.workers)]
        for p in procs:
            p.start()
        try:
            deadline = time.monotonic() + args.timeout * (args.epochs + 2)
            ended = False           # a worker failed, all exited, or out of time
            while len(epochs) < args.epochs:
                try:
                    e = results.get(timeout=0.2 if ended else 1.0)
                except queue.Empty:
                    if ended:
                        break       # drained what the exited workers sent
                    if time.monotonic() > deadline:
                        print("ctr: no result in time", file=sys.stderr)
                        ended = True
                    elif all(p.exitcode is not None for p in procs) or any(
                            p.exitcode not in (None, 0) for p in procs):
                        ended = True
                    continue
                epochs.append(e)
                print(f"epoch {e['epoch']}: train logloss {e['train_logloss']:.4f}  "
                      f"held-out logloss {e['logloss']:.4f}  AUC {e['auc']:.4f}  "
                      f"({e['seconds']:.1f} s)", flush=True)
            if not any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:     # finishing: the job ends when both finished
                    p.join(timeout=max(1.0, min(30.0, deadline - time.monotonic())))
        finally:
            for p in procs:     # a failed worker leaves the others at a barrier
                if p.is_alive():
                    p.terminate()
                    p.join(10)
    failed = [p.name for p in procs if p.exitcode != 0]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"data": args.data, "constant_logloss": constant,
                       "hidden_model_logloss": bayes, "epochs": epochs}, f, indent=1)
    if failed or len(epochs) < args.epochs:
        print(f"ctr: failed ({', '.join(failed) or 'missing epochs'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
