"""MultiMLP: many tiny MLPs, one per cell, evaluated together with batched matmuls.

Every parameter tensor has leading dimension ``n_cells`` so that a per-cell optimiser
(``BatchedLBFGS``) can treat dim 0 as the cell index.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from .activations import ACTIVATIONS, PositionalEncoding, init_layer_, make_activation
from .backends import dense_chunk_bytes


class MultiMLP(nn.Module):
    """``n_cells`` independent MLPs ``d_in -> width x depth -> d_out``.

    Parameters: ``weights[l]`` ``[n_cells, fan_in, fan_out]``, ``biases[l]`` ``[n_cells, fan_out]``.
    ``depth`` counts hidden layers, so there are ``depth + 1`` linear layers; the last is linear.

    Args:
        n_cells: number of networks.
        d_in, d_out: input and output width.
        width, depth: hidden width and number of hidden layers (both >= 1).
        activation: ``"sine"`` | ``"gaussian"`` | ``"relu_pe"``.
        omega_0: sine frequency (sine only).
        sigma: Gaussian width (gaussian only).
        pe_freqs: positional-encoding octaves (relu_pe only).
        generator: optional ``torch.Generator`` for the initialisation.
    """

    def __init__(self, n_cells: int, d_in: int, d_out: int, width: int = 32, depth: int = 3,
                 activation: str = "sine", omega_0: float = 30.0, sigma: float = 0.1,
                 pe_freqs: int = 5, generator: Optional[torch.Generator] = None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of "
                             f"{', '.join(ACTIVATIONS)}")
        for name, v in (("n_cells", n_cells), ("d_in", d_in), ("d_out", d_out),
                        ("width", width), ("depth", depth)):
            if int(v) <= 0:
                raise ValueError(f"MultiMLP: {name} must be positive, got {v}")
        self.n_cells, self.d_in, self.d_out = int(n_cells), int(d_in), int(d_out)
        self.width, self.depth, self.activation = int(width), int(depth), activation
        self.omega_0, self.sigma, self.pe_freqs = float(omega_0), float(sigma), int(pe_freqs)
        self.encoding = PositionalEncoding(pe_freqs) if activation == "relu_pe" else None
        # bytes of one hidden activation per chunk of cells in forward_dense (None: the
        # backend's choice, 0: one call over all cells)
        self.chunk_bytes: Optional[int] = None
        self.act = make_activation(activation, omega_0, sigma)
        first = self.encoding.out_dim(d_in) if self.encoding is not None else d_in
        dims = [first] + [self.width] * self.depth + [self.d_out]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for layer, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            w = torch.empty(n_cells, a, b, dtype=dtype, device=device)
            bias = torch.empty(n_cells, b, dtype=dtype, device=device)
            init_layer_(w, bias, activation, layer, omega_0, generator)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(bias))

    @property
    def params_per_cell(self) -> int:
        return sum(p[0].numel() for p in self.parameters())

    def select(self, cells: torch.Tensor) -> "MultiMLP":
        """A new MultiMLP of the networks ``cells [k]`` (copies of their parameters), e.g.
        one rank's share of a sharded fit."""
        w0 = self.weights[0]
        out = MultiMLP(int(cells.numel()), self.d_in, self.d_out, self.width, self.depth,
                       self.activation, self.omega_0, self.sigma, self.pe_freqs,
                       dtype=w0.dtype, device=w0.device)
        with torch.no_grad():
            for dst, src in zip(out.parameters(), self.parameters()):
                dst.copy_(src.index_select(0, cells.to(src.device)))
        return out

    def layer_params(self, cells: Optional[torch.Tensor] = None
                     ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(weight, bias) per layer, for all cells or the cells listed in ``cells [k]``."""
        out = []
        for w, b in zip(self.weights, self.biases):
            if cells is not None:
                w, b = w.index_select(0, cells), b.index_select(0, cells)
            out.append((w, b))
        return out

    def forward_dense(self, x: torch.Tensor, cells: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Evaluate every cell on its own points.

        Args:
            x: ``[n, P, d_in]`` local coordinates (``n == n_cells``, or ``len(cells)``), or
               ``[1, P, d_in]`` / ``[P, d_in]`` to give every cell the same points.
            cells: optional ``[n]`` long: evaluate only these cells.
        Returns:
            ``[n, P, d_out]``.

        On the CPU the cells are evaluated a chunk at a time, each chunk's hidden
        activations about :attr:`chunk_bytes` large (default
        :func:`~kilonerf_lbfgs.backends.dense_chunk_bytes`): a chunk's layers then run on
        data still in the cache, forward and backward, several times faster than one call
        over all cells. The result is the same as one call (``chunk_bytes = 0``).
        """
        if x.dim() == 2:
            x = x[None]
        n = self.n_cells if cells is None else int(cells.numel())
        if x.shape[0] not in (1, n):
            raise ValueError(f"MultiMLP.forward_dense: x has {x.shape[0]} groups, "
                             f"expected {n}")
        layers = self.layer_params(cells)
        per = self._chunk_cells(x.shape[1], x.device)
        if per >= n:
            return self._forward_layers(x, layers)
        # split (not slice) the parameters: the backward of a split assembles every chunk's
        # gradient in one pass, where each slice's backward would fill a whole-size tensor
        parts = [(w.split(per), b.split(per)) for w, b in layers]
        xs = x.split(per) if x.shape[0] == n else [x] * len(parts[0][0])
        outs = [self._forward_layers(xk, [(ws[k], bs[k]) for ws, bs in parts])
                for k, xk in enumerate(xs)]
        return torch.cat(outs)

    def _chunk_cells(self, points: int, device) -> int:
        """Cells per chunk for ``points`` points per cell (see :meth:`forward_dense`)."""
        budget = self.chunk_bytes if self.chunk_bytes is not None \
            else dense_chunk_bytes(device)
        if budget <= 0:
            return 1 << 62
        row = 4 * max(self.width, self.d_out) * max(points, 1)
        return max(1, budget // row)

    def _forward_layers(self, x: torch.Tensor, layers) -> torch.Tensor:
        """``x [n or 1, P, d_in]`` through ``layers`` (``(weight, bias)`` of ``n`` cells)."""
        h = self.encoding(x) if self.encoding is not None else x
        n = layers[0][0].shape[0]
        if h.shape[0] == 1 and n > 1:
            # shared points: one plain matmul for the first layer, then per-cell bmm
            w, b = layers[0]
            h = torch.einsum("pi,nio->npo", h[0], w) + b[:, None, :]
            h = self.act(h)
            rest = layers[1:]
        else:
            rest = layers
        for i, (w, b) in enumerate(rest):
            h = torch.baddbmm(b[:, None, :], h, w)
            if i < len(rest) - 1:
                h = self.act(h)
        return h

    def forward(self, x: torch.Tensor, cell: torch.Tensor,
                max_group: Optional[int] = None) -> torch.Tensor:
        """Ragged evaluation: ``x [M, d_in]`` local coordinates of points in cells ``cell [M]``.

        Points are grouped by cell (a stable sort); a cell with more than ``max_group``
        points is split into several groups that share its weights, so uneven counts (a
        NeRF cell on a surface next to one that a ray barely grazes) cost at most about
        twice the points, not ``n_groups x largest count``. The groups are padded,
        evaluated with batched matmuls, and returned in the input order. Cells with no
        points cost nothing. ``max_group`` defaults to twice the mean count per non-empty
        cell (at least 32). Returns ``[M, d_out]``.
        """
        if x.shape[0] == 0:
            return x.new_zeros(0, self.d_out)
        packed = pack_by_cell(cell, self.n_cells, max_group=max_group)
        xp = x.new_zeros(packed.n_groups, packed.width, x.shape[1])
        xp[packed.group, packed.slot] = x[packed.order]
        out_p = self.forward_dense(xp, packed.cells)
        out = torch.empty(x.shape[0], self.d_out, dtype=out_p.dtype, device=x.device)
        out[packed.order] = out_p[packed.group, packed.slot]
        return out

    def cell_module(self, cell: int) -> nn.Sequential:
        """Cell ``cell`` as an ordinary ``nn.Sequential`` with the same outputs (a copy)."""
        mods: List[nn.Module] = []
        if self.encoding is not None:
            mods.append(PositionalEncoding(self.pe_freqs))
        n_layers = len(self.weights)
        for layer in range(n_layers):
            w = self.weights[layer][cell]
            lin = nn.Linear(w.shape[0], w.shape[1], dtype=w.dtype, device=w.device)
            with torch.no_grad():
                lin.weight.copy_(w.T)
                lin.bias.copy_(self.biases[layer][cell])
            mods.append(lin)
            if layer < n_layers - 1:
                mods.append(make_activation(self.activation, self.omega_0, self.sigma))
        return nn.Sequential(*mods)


class CellPacking:
    """Where each point goes in a padded ``[n_groups, width]`` layout grouped by cell.

    Attributes:
        order: ``[M]`` point indices sorted by cell (stable).
        group: ``[M]`` group of each sorted point; ``slot``: ``[M]`` its position in the group.
        cells: ``[n_groups]`` the cell id of each group (cells with at least one point).
        counts: ``[n_groups]`` points per group; ``width``: the largest count.
    """

    def __init__(self, order, group, slot, cells, counts, width):
        self.order, self.group, self.slot = order, group, slot
        self.cells, self.counts, self.width = cells, counts, width

    @property
    def n_groups(self) -> int:
        return int(self.cells.numel())


def pack_by_cell(cell: torch.Tensor, n_cells: int,
                 max_group: Optional[int] = None) -> CellPacking:
    """Group points by cell id ``cell [M]`` (all ids in ``[0, n_cells)``).

    With ``max_group`` (``None``: twice the mean count per non-empty cell, at least 32;
    ``0``: no limit) a cell's points are split into consecutive groups of at most that
    many points, each group naming the cell (``cells`` may then repeat an id).
    """
    if cell.numel() and (int(cell.min()) < 0 or int(cell.max()) >= n_cells):
        raise ValueError(f"cell ids must lie in [0, {n_cells}); got "
                         f"{int(cell.min())}..{int(cell.max())}")
    sorted_cell, order = torch.sort(cell, stable=True)
    counts_all = torch.bincount(cell, minlength=n_cells)
    cells = torch.nonzero(counts_all, as_tuple=False).flatten()
    counts = counts_all[cells]
    if max_group is None:
        max_group = max(32, -(-2 * cell.numel() // max(cells.numel(), 1)))
    if max_group <= 0:
        max_group = int(counts.max()) if counts.numel() else 1
    # split each cell into ceil(count / max_group) groups
    n_split = (counts + max_group - 1) // max_group
    first_group = torch.cumsum(n_split, 0) - n_split
    rank_of_cell = torch.full((n_cells,), -1, dtype=torch.long, device=cell.device)
    rank_of_cell[cells] = torch.arange(cells.numel(), device=cell.device)
    rank = rank_of_cell[sorted_cell]
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(cell.numel(), device=cell.device) - starts[rank]
    group = first_group[rank] + pos // max_group
    slot = pos % max_group
    group_cells = torch.repeat_interleave(cells, n_split)
    group_counts = torch.bincount(group, minlength=int(n_split.sum()))
    width = int(group_counts.max()) if group_counts.numel() else 0
    return CellPacking(order, group, slot, group_cells, group_counts, width)
