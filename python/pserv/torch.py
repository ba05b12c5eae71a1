"""PyTorch layers whose parameters live on pserv servers.

- :class:`ShardedEmbedding`: an ``nn.Module`` like ``nn.Embedding`` whose table is held by
  the servers. ``forward`` pulls only the rows a batch uses; ``backward`` pushes their
  gradients, and the servers' update rule (``sgd``, ``adagrad``, ``ftrl``, ... as the
  cluster was started with) applies them. No optimizer step on the worker.
- :class:`ShardedParameters`: the dense parameters of an ordinary torch module kept in a
  key range on the servers (``pull`` before a step, ``push_grads`` after ``backward``), so
  that every worker trains the same dense part.

Needs torch (``pip install torch``); ``import pserv`` does not import this module.

Key layout. The servers store ``worker.value_len`` values per u64 key. A table of
``num_features`` rows of ``dim`` values starting at ``key_offset`` uses:

- ``value_len == dim``: one key per row, ``key_offset + row`` (the row is the key's
  vector; the fewest keys on the wire);
- ``value_len == 1``: one key per value, row-major, ``key_offset + row * dim + j`` for
  column ``j`` (tables of different widths can then share one cluster);

any other ``value_len`` is refused. Tables sharing a cluster need disjoint key ranges:
``table.key_range`` is ``(begin, end)``, so the next table can start at ``end``.

Initialisation. Servers start every key at zero. For a random start, one worker assigns
values with the ``assign`` rule (function id 1, whatever the servers' default rule is)
and every worker waits at a barrier: :meth:`ShardedEmbedding.init_normal_` and
:meth:`ShardedParameters.init_` do that. An assignment sets the weights only: SGD and
AdaGrad go on from them; FTRL recomputes its weights from its own state at the first
update of a key, so it keeps little of a random start (leave FTRL tables at zero).

Example::

    import torch, pserv
    from pserv.torch import ShardedEmbedding

    with pserv.LocalCluster(servers=2, workers=1, value_len=8, update="adagrad:0.1") as c:
        w = c.worker(0)
        emb = ShardedEmbedding(1000, 8, worker=w)
        emb.init_normal_(std=0.01)
        ids = torch.tensor([[1, 5], [5, 999]])
        loss = emb(ids).pow(2).sum()
        loss.backward()          # pushes the gradients of rows 1, 5 (summed) and 999
        emb.flush()              # wait for that push (the next forward also does)
        w.finish()
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import _pserv

__all__ = ["ShardedEmbedding", "ShardedParameters", "hash_ids", "FUNC_ASSIGN"]

#: Update function id of the ``assign`` rule (``engine/src/update/registry.rs``): a push
#: with ``func=FUNC_ASSIGN`` sets the values instead of applying the servers' rule.
FUNC_ASSIGN = 1

_KEY_LIMIT = 2**64 - 1  # keys are in [0, 2**64 - 1)
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def hash_ids(ids: np.ndarray, buckets: int, seed: int = 0) -> np.ndarray:
    """Hash int64 ids into ``[0, buckets)`` (splitmix64 of ``id ^ seed``, mod ``buckets``).

    Deterministic across processes and runs; negative ids hash like their two's
    complement. Returns an int64 array of the same shape.
    """
    x = np.asarray(ids, dtype=np.int64).astype(np.uint64) ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(buckets)).astype(np.int64)


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor viewing ``array`` without a copy, also when it is read-only (pulled
    arrays are; the tensor is only read from)."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _check_int(name: str, v: object, low: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    return v


class _Lookup(torch.autograd.Function):
    """Gather rows pulled from the servers; push their gradients back in ``backward``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, anchor: torch.Tensor, table: "ShardedEmbedding", ids: torch.Tensor
    ) -> torch.Tensor:
        rows, inverse = table._unique_rows(ids)
        keys = table._keys_of(rows)
        pulled = table._pull(keys)
        out = pulled.index_select(0, inverse).reshape(*ids.shape, table.dim)
        ctx.table = table
        ctx.keys = keys
        ctx.nrows = len(rows)
        ctx.save_for_backward(inverse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[None, None, None]:  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        ctx.table._push_grads(ctx.keys, ctx.nrows, inverse, grad)
        return None, None, None


class ShardedEmbedding(torch.nn.Module):
    """An embedding table of ``num_features`` rows of ``dim`` values held by pserv
    servers, used like ``torch.nn.Embedding``.

    ``forward(ids)`` (a LongTensor of any shape) dedups the ids (``torch.unique``), pulls
    those rows once and returns a tensor of shape ``ids.shape + (dim,)`` in the cluster's
    value type (float32 for "f32", float64 for "f64") that requires grad. Its
    ``backward`` sums the gradient per distinct row and pushes it; the servers apply
    their update rule (with ``update="sgd:LR"``: ``w -= LR * grad``). The push is sent
    without waiting; the next ``forward`` pulls after it (so a worker reads its own
    updates), and :meth:`flush` waits for it. The table has no torch parameters: leave it
    out of the optimizer (``model.parameters()`` does not list it).

    Keys: see the module doc (``value_len == dim``: one key per row; ``value_len == 1``:
    row-major, one key per value). The table covers ``key_range``.

    Parameters:
        num_features: rows of the table (with ``hashed``: hash buckets).
        dim: values per row.
        worker: the ``pserv.Worker`` to pull and push through.
        key_offset: the table's first key.
        hashed: hash every id into ``[0, num_features)`` (:func:`hash_ids`) instead of
            requiring ``0 <= id < num_features``; any int64 id is then valid, and ids
            whose hashes collide share a row.
        hash_seed: the seed of the hash.
        consistency: the consistency model of this table's pulls and pushes (``None``:
            the worker's default).
    """

    def __init__(
        self,
        num_features: int,
        dim: int,
        *,
        worker: _pserv.Worker,
        key_offset: int = 0,
        hashed: bool = False,
        hash_seed: int = 0,
        consistency: Optional[str] = None,
    ) -> None:
        super().__init__()
        _check_int("num_features", num_features, 1)
        _check_int("dim", dim, 1)
        _check_int("key_offset", key_offset, 0)
        vl = worker.value_len
        if vl == dim:
            keys_per_row = 1
        elif vl == 1:
            keys_per_row = dim
        else:
            raise ValueError(
                f"the cluster stores {vl} values per key: a table of dim {dim} needs "
                f"value_len {dim} (one key per row) or 1 (one key per value)"
            )
        end = key_offset + num_features * keys_per_row
        if end > _KEY_LIMIT:
            raise ValueError(f"keys [{key_offset}, {end}) run past the key space (2**64 - 1)")
        self.num_features = num_features
        self.dim = dim
        self.worker = worker
        self.key_offset = key_offset
        self.hashed = bool(hashed)
        self.hash_seed = int(hash_seed)
        self.consistency = consistency
        self.keys_per_row = keys_per_row
        self.dtype: torch.dtype = torch.float32 if worker.value_type == "f32" else torch.float64
        # Makes the output require grad; not a parameter (nothing for an optimizer).
        self._anchor = torch.zeros(0, requires_grad=True)
        # Pushes sent and not yet waited for: (timestamp, keys, values), arrays kept alive
        # until then (they are sent from their own memory).
        self._pending: List[Tuple[int, np.ndarray, np.ndarray]] = []

    @property
    def key_range(self) -> Tuple[int, int]:
        """The table's keys, ``[begin, end)``."""
        return self.key_offset, self.key_offset + self.num_features * self.keys_per_row

    def extra_repr(self) -> str:
        b, e = self.key_range
        return (f"{self.num_features}, {self.dim}, keys=[{b}, {e}), "
                f"keys_per_row={self.keys_per_row}, hashed={self.hashed}")

    # ------------------------------------------------------------------ rows and keys
    def rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The table rows of ``ids`` (hashed when ``hashed``), an int64 tensor of the same
        shape. Raises ``IndexError`` for an id outside ``[0, num_features)`` when not
        hashed."""
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
        ids = ids.detach().to("cpu", torch.int64)
        if self.hashed:
            return torch.from_numpy(hash_ids(ids.numpy(), self.num_features, self.hash_seed))
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_features):
            raise IndexError(
                f"ids must be in [0, {self.num_features}), got min {int(ids.min())} "
                f"max {int(ids.max())} (hashed=True takes any id)"
            )
        return ids

    def _unique_rows(self, ids: torch.Tensor) -> Tuple[np.ndarray, torch.Tensor]:
        rows = self.rows_of(ids).reshape(-1)
        uniq, inverse = torch.unique(rows, sorted=True, return_inverse=True)
        return uniq.numpy(), inverse

    def _keys_of(self, rows: np.ndarray) -> np.ndarray:
        """The sorted keys of sorted distinct ``rows``, in memory pushes send uncopied."""
        k = self.keys_per_row
        keys = _pserv.zeros(len(rows) * k, dtype=np.uint64)
        base = rows.astype(np.uint64) * np.uint64(k) + np.uint64(self.key_offset)
        if k == 1:
            keys[:] = base
        else:
            keys.reshape(len(rows), k)[:] = base[:, None] + np.arange(k, dtype=np.uint64)
        return keys

    # ------------------------------------------------------------------ traffic
    def _pull(self, keys: np.ndarray) -> torch.Tensor:
        """Pull ``keys`` after the pushes in flight; the rows as an (n, dim) tensor
        (viewing the received answer when one server sent it all)."""
        w = self.worker
        after = [ts for ts, _, _ in self._pending]
        try:
            got = w.wait_pull(w.pull(keys, after=after, consistency=self.consistency))
        finally:
            self._drain()
        return _as_tensor(got).view(-1, self.dim)

    def _drain(self) -> None:
        pending, self._pending = self._pending, []
        for ts, _, _ in pending:
            self.worker.wait(ts)

    def _push_grads(self, keys: np.ndarray, nrows: int, inverse: torch.Tensor,
                    grad: torch.Tensor) -> None:
        if nrows == 0:
            return
        values = self.worker.zeros(nrows * self.dim)
        summed = torch.from_numpy(values).view(nrows, self.dim)
        summed.index_add_(0, inverse, grad.reshape(-1, self.dim).to(self.dtype))
        ts = self.worker.push(keys, values, consistency=self.consistency)
        self._pending.append((ts, keys, values))

    def flush(self) -> None:
        """Wait until the gradient pushes sent by ``backward`` are applied (raises the
        ``pserv.PservError`` of one that failed)."""
        self._drain()

    # ------------------------------------------------------------------ use
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of ``ids``: shape ``ids.shape + (dim,)``, requiring grad when grad
        mode is on."""
        return _Lookup.apply(self._anchor, self, ids)

    def pull_rows(self, rows: Union[Sequence[int], np.ndarray]) -> torch.Tensor:
        """The current values of table rows ``rows`` (row numbers, not hashed), as a new
        ``(len(rows), dim)`` tensor without grad."""
        r = np.asarray(rows, dtype=np.int64).reshape(-1)
        if r.size and (r.min() < 0 or r.max() >= self.num_features):
            raise IndexError(f"rows must be in [0, {self.num_features})")
        uniq, inverse = np.unique(r, return_inverse=True)
        got = self._pull(self._keys_of(uniq))
        return got[torch.from_numpy(inverse.reshape(-1))]

    def weight(self) -> torch.Tensor:
        """The whole table, ``(num_features, dim)`` (pulls every key: small tables)."""
        return self.pull_rows(range(self.num_features))

    def assign_(self, values: torch.Tensor,
                rows: Union[Sequence[int], np.ndarray, None] = None) -> None:
        """Set rows ``rows`` (default: all, in order) to ``values`` (shape
        ``(len(rows), dim)``) on the servers with the ``assign`` rule, and wait. Not
        collective: the other workers see it once it is done (use a barrier)."""
        r = np.arange(self.num_features) if rows is None else np.asarray(rows, np.int64)
        v = torch.as_tensor(values).detach().to("cpu", self.dtype).reshape(-1, self.dim)
        if v.shape[0] != len(r):
            raise ValueError(f"values has {v.shape[0]} rows for {len(r)} rows")
        if len(r) == 0:
            return
        if len(np.unique(r)) != len(r):
            raise ValueError("rows must be distinct")
        order = np.argsort(r, kind="stable")
        keys = self._keys_of(r[order])
        buf = self.worker.zeros(len(r) * self.dim)
        torch.from_numpy(buf).view(len(r), self.dim)[:] = v[torch.from_numpy(order)]
        self._drain()
        self.worker.wait(self.worker.push(keys, buf, func=FUNC_ASSIGN))

    def init_normal_(self, std: float = 0.01, seed: int = 0, *, rank: int = 0,
                     chunk_rows: int = 1 << 16, barrier: bool = True) -> None:
        """Random start: worker ``rank`` assigns N(0, std^2) values (from a torch
        generator seeded with ``seed``, ``chunk_rows`` rows a push), then, with
        ``barrier``, every worker waits at a barrier: call it on every worker."""
        if self.worker.rank == rank:
            g = torch.Generator().manual_seed(seed)
            for begin in range(0, self.num_features, chunk_rows):
                end = min(begin + chunk_rows, self.num_features)
                vals = torch.randn(end - begin, self.dim, generator=g, dtype=torch.float64)
                self.assign_(vals * std, np.arange(begin, end))
        if barrier:
            self.worker.barrier()


class ShardedParameters:
    """The dense parameters of torch modules, kept in one key range on the servers.

    The parameters are laid out one after the other, flattened, from ``key_offset``
    (``value_len`` values per key, the last key padded): ``key_range`` is ``(begin,
    end)``. A training step::

        dense.pull()                 # server values -> the local parameters
        loss = model(batch)
        loss.backward()
        dense.push_grads()           # local .grad -> servers apply their update rule

    The local parameters are only a copy: do not give them to a torch optimizer too.

    Parameters:
        params: the parameters (``module.parameters()``).
        worker: the ``pserv.Worker`` to pull and push through.
        key_offset: the first key of the range.
        consistency: the consistency model of the pulls and pushes (``None``: the
            worker's default).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], *, worker: _pserv.Worker,
                 key_offset: int = 0, consistency: Optional[str] = None) -> None:
        _check_int("key_offset", key_offset, 0)
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("no parameters")
        self.worker = worker
        self.consistency = consistency
        self.numel = sum(p.numel() for p in self.params)
        vl = worker.value_len
        nkeys = -(-self.numel // vl)
        if key_offset + nkeys > _KEY_LIMIT:
            raise ValueError("the range runs past the key space (2**64 - 1)")
        self.key_offset = key_offset
        self._end = key_offset + nkeys
        self._size = nkeys * vl
        self._dtype = torch.float32 if worker.value_type == "f32" else torch.float64

    @property
    def key_range(self) -> Tuple[int, int]:
        """The range's keys, ``[begin, end)``."""
        return self.key_offset, self._end

    def _flat(self, tensors: Iterable[Optional[torch.Tensor]]) -> np.ndarray:
        buf = self.worker.zeros(self._size)
        flat = torch.from_numpy(buf)
        at = 0
        for p, t in zip(self.params, tensors):
            n = p.numel()
            if t is not None:
                flat[at:at + n] = t.detach().reshape(-1).to("cpu", self._dtype)
            at += n
        return buf

    def pull(self) -> None:
        """Copy the servers' values into the local parameters (in place, no grad)."""
        w = self.worker
        got = _as_tensor(w.wait_pull(w.pull_range(self.key_offset, self._end,
                                                  consistency=self.consistency)))
        at = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                p.copy_(got[at:at + n].view_as(p))
                at += n

    def push_grads(self, wait: bool = True) -> int:
        """Push the local gradients (``p.grad``; zeros where it is ``None``); the servers
        apply their update rule. Waits for it unless ``wait=False``; returns the push's
        timestamp."""
        ts = self.worker.push_range(self.key_offset, self._end,
                                    self._flat(p.grad for p in self.params),
                                    consistency=self.consistency)
        if wait:
            self.worker.wait(ts)
        return ts

    def assign_local(self) -> None:
        """Set the servers' values to the local parameters (``assign`` rule), and wait."""
        w = self.worker
        w.wait(w.push_range(self.key_offset, self._end, self._flat(self.params),
                            func=FUNC_ASSIGN))

    def init_(self, *, rank: int = 0, barrier: bool = True) -> None:
        """Start from worker ``rank``'s local values (say, torch's default init): that
        worker assigns them, then, with ``barrier``, every worker waits at a barrier and
        pulls. Call it on every worker."""
        if self.worker.rank == rank:
            self.assign_local()
        if barrier:
            self.worker.barrier()
        self.pull()
