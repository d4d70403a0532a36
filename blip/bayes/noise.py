"""Noise context: where the noise rates and the random numbers of one forward pass live.

A forward pass of a wrapped backbone runs inside a :class:`NoiseContext`. Every
noisy layer asks it for its rate (computed on demand from the layer's input) and for
standard-normal (or, for MC dropout, uniform) draws.

Sampling draws are counter-based: every number is a hash of what it acts on, computed on
the tensor's device with integer arithmetic, no generator and no loop over graphs:
``(seed, replica, structure index, row identity, domain, layer, channel) -> N(0, 1)``.
A row's identity is the backbone's (``Backbone.domain_row_ids``): the atom's index in its
structure for atoms, ``(i, j, cell shift)`` for edges. So a sample does not depend on which
other structures or replicas share the batch, is the same on CPU and CUDA (up to float
rounding of log / cos), and stays a smooth potential when an edge enters or leaves the
neighbour list: the other rows keep their draws. With draws shared per structure
(``NoiseContext.row_structure``; BLIP's ``uq.noise_draws: structure`` outside training
steps) every row of a structure takes the same numbers, those of identity 0: a sample is
then one perturbed network, scaled per row by the row's own rate. Passes without a seed
draw from torch's global generator instead, independently per row.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

_MASK32 = 0xFFFFFFFF


def _int32(value: int) -> int:
    """A 32-bit pattern as the signed int32 with the same bits."""
    value = value & 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


_MUL1, _MUL2 = _int32(0x7FEB352D), _int32(0x846CA68B)  # "lowbias32" multipliers
_GOLDEN = _int32(0x9E3779B9)  # 2**32 / golden ratio: separates the words hashed in sequence


# The functions below are TorchScript-compatible (blip.export compiles them into exported
# models): TorchScript cannot read module-level constants, so they come in as default arguments.


def mix32(x: torch.Tensor, work: Optional[torch.Tensor] = None, mul1: int = _MUL1,
          mul2: int = _MUL2) -> torch.Tensor:
    """A bijective 32-bit integer hash (xor-shift-multiply, "lowbias32"), elementwise, in place.

    ``x``: int32 tensor, read as 32-bit patterns; returns it. Products wrap modulo 2**32 and
    right shifts are masked, so the bits are those of the unsigned hash on every device.
    ``work``: optional int32 scratch tensor of ``x``'s shape; with it no memory is allocated
    (fresh large allocations, not the arithmetic, are most of the cost on a CPU).
    """
    if work is None:
        work = torch.empty_like(x)
    torch.bitwise_right_shift(x, 16, out=work)
    x.bitwise_xor_(work.bitwise_and_(0xFFFF))
    x.mul_(mul1)
    torch.bitwise_right_shift(x, 15, out=work)
    x.bitwise_xor_(work.bitwise_and_(0x1FFFF))
    x.mul_(mul2)
    torch.bitwise_right_shift(x, 16, out=work)
    x.bitwise_xor_(work.bitwise_and_(0xFFFF))
    return x


def hash_words(key: torch.Tensor, words: torch.Tensor, golden: int = _GOLDEN, first: int = 0) -> torch.Tensor:
    """Fold integer ``words`` (rows, m) (any integer dtype; low 32 bits used) into ``key`` (rows,) int32;
    ``first``: the position of the first word in the sequence (words already folded into ``key``)."""
    for c in range(words.shape[1]):
        key = mix32(key ^ (words[:, c].to(torch.int32) + _int32(golden * (c + 1 + first))))
    return key


def _mul32(x: int, m: int, mask: int = _MASK32) -> int:
    """``x * m`` modulo 2**32 of two unsigned 32-bit ints, without intermediate beyond 2**49 (TorchScript
    ints are 64-bit)."""
    return (x & 0xFFFF) * m + (((x >> 16) * m) & 0xFFFF) * 65536 & mask


def mix32_int(x: int, mul1: int = 0x7FEB352D, mul2: int = 0x846CA68B, mask: int = _MASK32) -> int:
    """:func:`mix32` of one 32-bit pattern given as a Python int; returns the unsigned result."""
    x = x & mask
    x = x ^ (x >> 16)
    x = _mul32(x, mul1)
    x = x ^ (x >> 15)
    x = _mul32(x, mul2)
    return x ^ (x >> 16)


def hash_int_words(words: list[int], golden: int = _GOLDEN, mask: int = _MASK32) -> int:
    """:func:`hash_words` of a key 0 and constant ``words`` (low 32 bits of each), on the host; the int32 value."""
    key = 0
    for c, word in enumerate(words):
        key = mix32_int(key ^ ((word + golden * (c + 1)) & mask))
    return _int32(key)


def row_keys(seed: int, replica: torch.Tensor, structure_index: torch.Tensor, rows_per_graph: torch.Tensor,
             ids: torch.Tensor, mask: int = _MASK32) -> torch.Tensor:
    """One 32-bit key per row (rows,) int32 from (seed, replica, structure index, row identity).

    replica, structure_index, rows_per_graph: (G,) long; ids: (rows, m) long, the identity of
    every row within its structure (rows ordered graph by graph).
    """
    seed = int(seed)
    seed_key = hash_int_words([seed & mask, (seed >> 32) & mask])  # the constant words on the host
    graph_key = hash_words(torch.full(replica.shape, seed_key, dtype=torch.int32, device=replica.device),
                           torch.stack([replica, structure_index], dim=1), first=2)
    key = torch.repeat_interleave(graph_key, rows_per_graph, output_size=ids.shape[0])
    return hash_words(key, ids)


def positions_in_graph(rows_per_graph: torch.Tensor) -> torch.Tensor:
    """Position of every row within its graph, (rows,) long; ``rows_per_graph`` (G,) long."""
    start = torch.cumsum(rows_per_graph, 0) - rows_per_graph
    total = int(rows_per_graph.sum())
    return torch.arange(total, device=rows_per_graph.device) - torch.repeat_interleave(start, rows_per_graph,
                                                                                       output_size=total)


def stream_word(domain: str, slot: int) -> int:
    """32-bit identity of one noisy layer (its domain's name and slot), as an int32 value."""
    return _int32(zlib.crc32(domain.encode()) * 0x01000193 + int(slot) * 0x9E3779B9)


def _unit_interval(bits: torch.Tensor, dtype: torch.dtype, mask: int = _MASK32) -> torch.Tensor:
    """32-bit hashes (int32) -> uniforms in the open interval (0, 1): 32 bits in float64, 24 otherwise."""
    if dtype == torch.float64:
        return ((bits.to(torch.long) & mask).to(dtype) + 0.5) * 2.0 ** -32
    return ((bits >> 8) & 0xFFFFFF).to(torch.float32).add_(0.5).mul_(2.0 ** -24)


def _uniform_into(out: torch.Tensor, bits: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """:func:`_unit_interval` of ``bits`` written into the float tensor ``out`` (same values);
    ``work``: int32 scratch of ``bits``' shape (float32: the 24 high bits; float64: all 32)."""
    if out.dtype == torch.float64:
        out.copy_(bits).remainder_(2.0 ** 32)  # int32 -> its unsigned 32-bit value, exactly
        return out.add_(0.5).mul_(2.0 ** -32)
    torch.bitwise_right_shift(bits, 8, out=work)
    out.copy_(work.bitwise_and_(0xFFFFFF))
    return out.add_(0.5).mul_(2.0 ** -24)


def column_hashes(stream: int, columns: int, device: torch.device) -> torch.Tensor:
    """Hashes (columns,) int32 of (layer stream, column): one per channel (or channel pair)."""
    return mix32(torch.arange(columns, dtype=torch.int32, device=device) * 2 + stream)


def _element_bits(keys: torch.Tensor, stream: int, columns: int,
                  column: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Hashes (rows, columns) int32 of (row key, layer stream, column); ``column``: the
    :func:`column_hashes` of (stream, columns) when the caller has them."""
    if column is None:
        column = column_hashes(stream, columns, keys.device)
    return mix32(keys[:, None] ^ column[None, :])


def counter_uniform(keys: torch.Tensor, stream: int, channels: int, dtype: torch.dtype,
                    column: Optional[torch.Tensor] = None) -> torch.Tensor:
    """U(0, 1) draws (rows, channels) from row ``keys`` (rows,) int32 and a layer ``stream``;
    ``column``: optionally the :func:`column_hashes` of (stream, channels)."""
    return _unit_interval(_element_bits(keys, stream, channels, column), dtype).to(dtype)


def counter_normal(keys: torch.Tensor, stream: int, channels: int, dtype: torch.dtype,
                   column: Optional[torch.Tensor] = None, golden: int = _GOLDEN) -> torch.Tensor:
    """N(0, 1) draws (rows, channels) from row ``keys`` (rows,) int32 and a layer ``stream``;
    ``column``: optionally the :func:`column_hashes` of (stream, ceil(channels / 2)).

    Box-Muller on two uniforms per pair of channels (one hashed from the other): channel c
    and c + ceil(channels / 2) are the cosine and sine of one pair, independent normals.
    |draw| < 5.9 in float32 and < 6.7 in float64 (the resolution of the uniforms).
    Written in place into a few buffers: allocating fresh memory for every intermediate
    cost more than the arithmetic on a CPU.
    """
    work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    rows, pairs = keys.shape[0], (channels + 1) // 2
    if column is None:
        column = column_hashes(stream, pairs, keys.device)
    bits = keys[:, None] ^ column[None, :]
    scratch = torch.empty_like(bits)
    bits = mix32(bits, scratch)
    radius = torch.empty((rows, pairs), dtype=work_dtype, device=keys.device)  # contiguous: strided
    angle = torch.empty_like(radius)                                   # transcendentals are slow
    _uniform_into(radius, bits, scratch).log_().mul_(-2.0).sqrt_()
    bits = mix32(bits.bitwise_xor_(golden), scratch)
    _uniform_into(angle, bits, scratch).mul_(2.0 * math.pi)
    out = torch.empty((rows, 2 * pairs), dtype=work_dtype, device=keys.device)
    torch.mul(radius, torch.cos(angle), out=out[:, :pairs])
    torch.mul(radius, angle.sin_(), out=out[:, pairs:])
    return out[:, :channels].to(dtype)


BATCH_ELEMENTS = 2 ** 17  # pairs of draws per batch of kernels on a CPU: small graphs are dispatch-bound,
# large ones memory-bound (one big block of several layers ran 1.3-1.8x slower than layer by layer)
BATCH_ELEMENTS_GPU = 2 ** 23  # on a GPU kernel launches cost more than memory traffic: all layers at once


def counter_normals(keys: torch.Tensor, layers: list[tuple[int, int]], dtype: torch.dtype,
                    max_elements: int | None = None) -> list[torch.Tensor]:
    """:func:`counter_normal` draws of several layers ``[(stream, channels)]`` on the same rows;
    element by element the same numbers as one call per layer. Consecutive layers share one
    batch of kernels while rows x their pairs of channels stay within ``max_elements`` (None:
    ``BATCH_ELEMENTS`` on a CPU, ``BATCH_ELEMENTS_GPU`` on other devices)."""
    if max_elements is None:
        max_elements = BATCH_ELEMENTS if keys.device.type == "cpu" else BATCH_ELEMENTS_GPU
    out: list[torch.Tensor] = []
    group: list[tuple[int, int]] = []
    size = 0
    for stream, channels in layers:
        elements = keys.shape[0] * ((channels + 1) // 2)
        if group and size + elements > max_elements:
            out += _normals_at_once(keys, group, dtype)
            group, size = [], 0
        group.append((stream, channels))
        size += elements
    if group:
        out += _normals_at_once(keys, group, dtype)
    return out


def _normals_at_once(keys: torch.Tensor, layers: list[tuple[int, int]], dtype: torch.dtype) -> list[torch.Tensor]:
    """One :func:`counter_normal` call on the concatenated column hashes, split into the layers."""
    if len(layers) == 1:
        stream, channels = layers[0]
        return [counter_normal(keys, stream, channels, dtype, _cached_columns(stream, (channels + 1) // 2, keys))]
    pairs = [(channels + 1) // 2 for _, channels in layers]
    columns = torch.cat([_cached_columns(stream, n, keys) for (stream, _), n in zip(layers, pairs)])
    total = columns.numel()
    draws = counter_normal(keys, 0, 2 * total, dtype, columns)  # (rows, 2 total): cosines | sines
    out, start = [], 0
    for (_, channels), n in zip(layers, pairs):
        out.append(torch.cat([draws[:, start:start + n], draws[:, total + start:total + start + n]], dim=1)[:, :channels])
        start += n
    return out


_COLUMNS: dict[tuple[int, int, str], torch.Tensor] = {}


def _cached_columns(stream: int, columns: int, like: torch.Tensor) -> torch.Tensor:
    """:func:`column_hashes` on ``like``'s device, computed once per (layer, width, device): a
    dozen small kernels less per noisy layer and pass (they dominate small graphs' draws)."""
    key = (stream, columns, str(like.device))
    if key not in _COLUMNS:
        _COLUMNS[key] = column_hashes(stream, columns, like.device)
    return _COLUMNS[key]


#: ``provider(domain, slot, rows, features) -> p (rows,)``: the dropout rate of one noisy layer.
#: ``features`` are the invariant features of that layer's input (rows, d), or None when the
#: provider does not ask for them (``wants_features`` False).
RateProvider = Callable[[str, int, int, "torch.Tensor | None"], torch.Tensor]


@dataclass
class NoiseContext:
    """Noise rates and random numbers for one forward pass.

    provider: gives each noisy layer its dropout rate ``p`` (rows,) when the layer runs; rates
    may depend on the layer's own input, so they are computed lazily, layer by layer.
    wants_features: whether layers pass their invariant input features to the provider.
    keys: domain -> (rows,) counter keys of its rows (:func:`row_keys`): reproducible draws;
    None draws from torch's global generator (training).
    kind: "gaussian" (BLIP, independent multiplicative weight noise, local reparameterisation),
    "gaussian_inputs" (BLIP, weight noise shared per input channel) or "bernoulli" (MC dropout).
    used: (domain, slot) -> the rates ``p`` (rows,) of every layer that ran (for the KL).
    plan: domain -> [(slot, channels)] of the normal draws a pass asks for (:class:`NoiseState`
    learns it from the first pass): the first request of a domain draws all its layers' numbers
    in one batch of kernels (the same numbers as layer by layer), the others take theirs.
    requested: (domain, slot, channels) of every normal draw asked for, in order (passes without a plan).
    active: domain -> (rows, 1), 1 for rows that take noise and 0 for those of noise-free graphs
    (``batch["noise_free"]``: a noise-free copy sharing the sampled pass); None: every row takes noise.
    row_structure: domain -> (rows,) long, the structure (graph) of every row when ``keys`` hold one
    key per structure (G,): every row takes its structure's draws (shared draws); None: one key per row.
    """

    provider: RateProvider
    keys: dict[str, torch.Tensor] | None = None
    kind: str = "gaussian"
    wants_features: bool = False
    used: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    plan: dict[str, list[tuple[int, int]]] | None = None
    requested: list[tuple[str, int, int]] = field(default_factory=list)
    active: dict[str, torch.Tensor] | None = None
    row_structure: dict[str, torch.Tensor] | None = None
    _drawn: dict[tuple[str, torch.dtype], dict[tuple[int, int], torch.Tensor]] = field(default_factory=dict)
    _scales: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def fixed(cls, rates: dict[str, torch.Tensor], keys: dict | None = None, kind: str = "gaussian") -> "NoiseContext":
        """A context with given rates: domain -> p of shape (rows, layers of the domain)."""
        return cls(lambda domain, slot, rows, features: rates[domain][:, slot], keys, kind)

    def rate(self, domain: str, slot: int, rows: int, features: torch.Tensor | None = None) -> torch.Tensor:
        """Dropout rate ``p`` of the layers with rate slot ``slot``, shape (rows,); recorded in ``used``.

        A later layer of an MLP asks without features and gets the rate its first layer computed.
        """
        key = (domain, slot)
        if features is None and key in self.used:
            return self.used[key]
        p = self.provider(domain, slot, rows, features)
        if self.active is not None and self.kind == "bernoulli":  # dropout rate 0: the noise-free pass
            p = p * self.active[domain][:, 0]
        self.used[key] = p
        self._scales.pop(key, None)
        return p

    def noise_scale(self, domain: str, slot: int) -> torch.Tensor:
        """``sqrt(p / (1 - p))`` (rows, 1) of the rate ``p`` of rate slot ``slot`` (:meth:`rate` first): the
        standard deviation of the multiplicative noise, computed once per pass for the layers sharing it."""
        key = (domain, slot)
        scale = self._scales.get(key)
        if scale is None:
            p = self.used[key][:, None]
            scale = self._scales[key] = torch.sqrt(p / (1.0 - p))
        return scale

    def standard_normal(self, domain: str, slot: int, rows: int, channels: int, like: torch.Tensor) -> torch.Tensor:
        """N(0, 1) draws (rows, channels) for noisy layer ``slot`` of ``domain``, dtype and device of ``like``;
        zero on the rows of noise-free graphs (``active``): every Gaussian kind is then exactly noise-free there."""
        draws = self._per_row(domain, self._standard_normal(domain, slot, rows, channels, like))
        return draws if self.active is None else draws * self.active[domain].to(draws.dtype)

    def _per_row(self, domain: str, draws: torch.Tensor) -> torch.Tensor:
        """Draws (keys, channels) -> (rows, channels): each row takes its structure's when the keys are
        one per structure (``row_structure``), else they already are per row."""
        if self.row_structure is None:
            return draws
        return draws.index_select(0, self.row_structure[domain])

    def _standard_normal(self, domain: str, slot: int, rows: int, channels: int, like: torch.Tensor) -> torch.Tensor:
        keys = self._keys(domain, rows)
        if keys is None:
            return torch.randn((rows, channels), dtype=like.dtype, device=like.device)
        if self.plan is None:  # a first pass: it shows the plan of later ones
            self.requested.append((domain, slot, channels))
            planned = []
        else:
            planned = self.plan.get(domain, [])
        if (slot, channels) in planned:
            drawn = self._drawn.get((domain, like.dtype))
            if drawn is None:
                drawn = dict(zip(planned, counter_normals(keys, [(stream_word(domain, s), c) for s, c in planned],
                                                          like.dtype)))
                self._drawn[(domain, like.dtype)] = drawn
            return drawn[(slot, channels)]
        stream = stream_word(domain, slot)
        return counter_normal(keys, stream, channels, like.dtype, _cached_columns(stream, (channels + 1) // 2, like))

    def uniform(self, domain: str, slot: int, rows: int, channels: int, like: torch.Tensor) -> torch.Tensor:
        """U(0, 1) draws (rows, channels) for noisy layer ``slot`` of ``domain``, dtype and device of ``like``."""
        keys = self._keys(domain, rows)
        if keys is None:
            return torch.rand((rows, channels), dtype=like.dtype, device=like.device)
        stream = stream_word(domain, slot)
        return self._per_row(domain, counter_uniform(keys, stream, channels, like.dtype,
                                                     _cached_columns(stream, channels, like)))

    def _keys(self, domain: str, rows: int) -> torch.Tensor | None:
        if self.keys is None:
            return None
        keys = self.keys[domain]
        graph_rows = (keys if self.row_structure is None else self.row_structure[domain]).shape[0]
        if graph_rows != rows:
            raise RuntimeError(f"noise domain '{domain}': layer has {rows} rows but the graphs have {graph_rows}")
        return keys


class NoiseState:
    """Holder shared by all noisy layers of one model; ``ctx`` is None outside sampling.

    It remembers which normal draws a pass of each noise kind asked for (the plan of
    :class:`NoiseContext`) and gives later contexts that plan."""

    def __init__(self):
        self.ctx: NoiseContext | None = None
        self.plans: dict[str, dict[str, list[tuple[int, int]]]] = {}

    @contextlib.contextmanager
    def use(self, ctx: NoiseContext | None):
        previous, self.ctx = self.ctx, ctx
        if ctx is not None and ctx.plan is None:
            ctx.plan = self.plans.get(ctx.kind)
        try:
            yield ctx
        finally:
            self.ctx = previous
            if ctx is not None and ctx.requested and ctx.kind not in self.plans:
                plan: dict[str, list[tuple[int, int]]] = {}
                for domain, slot, channels in ctx.requested:
                    if (slot, channels) not in plan.setdefault(domain, []):
                        plan[domain].append((slot, channels))
                self.plans[ctx.kind] = plan
