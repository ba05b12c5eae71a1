"""Type stubs of pserv.torch (see the docstrings in pserv/torch.py)."""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt
import torch

from ._pserv import Worker

__all__ = ["ShardedEmbedding", "ShardedParameters", "hash_ids", "FUNC_ASSIGN"]

FUNC_ASSIGN: int

def hash_ids(
    ids: npt.ArrayLike, buckets: int, seed: int = 0
) -> npt.NDArray[np.int64]:
    """Hash int64 ids into ``[0, buckets)`` (splitmix64 of ``id ^ seed``)."""

class ShardedEmbedding(torch.nn.Module):
    """An embedding table held by pserv servers, used like ``torch.nn.Embedding``."""

    num_features: int
    dim: int
    worker: Worker
    key_offset: int
    hashed: bool
    hash_seed: int
    consistency: Optional[str]
    keys_per_row: int
    dtype: torch.dtype
    def __init__(
        self,
        num_features: int,
        dim: int,
        *,
        worker: Worker,
        key_offset: int = 0,
        hashed: bool = False,
        hash_seed: int = 0,
        consistency: Optional[str] = None,
    ) -> None: ...
    @property
    def key_range(self) -> Tuple[int, int]: ...
    def rows_of(self, ids: torch.Tensor) -> torch.Tensor: ...
    def forward(self, ids: torch.Tensor) -> torch.Tensor: ...
    def __call__(self, ids: torch.Tensor) -> torch.Tensor: ...
    def flush(self) -> None: ...
    def pull_rows(self, rows: Union[Sequence[int], np.ndarray]) -> torch.Tensor: ...
    def weight(self) -> torch.Tensor: ...
    def assign_(self, values: torch.Tensor,
                rows: Union[Sequence[int], np.ndarray, None] = None) -> None: ...
    def init_normal_(
        self,
        std: float = 0.01,
        seed: int = 0,
        *,
        rank: int = 0,
        chunk_rows: int = 65536,
        barrier: bool = True,
    ) -> None: ...

class ShardedParameters:
    """The dense parameters of torch modules, kept in one key range on the servers."""

    params: List[torch.nn.Parameter]
    worker: Worker
    consistency: Optional[str]
    numel: int
    key_offset: int
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        *,
        worker: Worker,
        key_offset: int = 0,
        consistency: Optional[str] = None,
    ) -> None: ...
    @property
    def key_range(self) -> Tuple[int, int]: ...
    def pull(self) -> None: ...
    def push_grads(self, wait: bool = True) -> int: ...
    def assign_local(self) -> None: ...
    def init_(self, *, rank: int = 0, barrier: bool = True) -> None: ...
