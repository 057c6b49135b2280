"""Where FMD goes in a model: conv and skip sites, found with one probe forward.

No per-family tables. One forward pass of a small input records a data-flow graph: a
``TorchFunctionMode`` sees every tensor operation (including the residual ``add`` that no module
hook sees) and module hooks see which module ran on which tensor. From that graph:

* **conv site** -- the normalisation that directly consumes a convolution's output (the site is the
  norm's output, i.e. before the activation, where timm's DropBlock sits); when the convolution
  (or a fully connected layer producing a ``(B, C)`` vector) is followed by an activation module
  instead, the activation's output; otherwise the convolution's own output. A convolution whose
  output only gates a larger map (squeeze-and-excitation) is not a site.
* **skip site** -- the output of the innermost module inside which a residual ``add`` joins two
  same-shape tensors that both derive from the module's input (the block input or its
  downsampled shortcut, and the residual branch), and whose output derives from that sum: the
  block output "where the residual addition happens".
* **slot** -- where timm already left an empty ``nn.Identity`` whose name contains ``drop`` right at
  the site (``BatchNormAct2d.drop``, ResNet's ``drop_block``), the op replaces it; otherwise a
  forward hook on the site module applies it.
* **next layer** -- the first ``Conv2d`` / ``Linear`` that consumes the site's output through
  size-preserving operations only (activations, views, residual adds, SE scaling) and whose input
  channels match. Pooling, concatenation or padding end the search: the last site before the
  head links to nothing, and the op falls back to the authors' fixed weight.

Stages are timm's own ``feature_info`` entries, indexed like ``out_indices`` (negatives allowed),
over all of the architecture's stages, also in a ``features_only`` model
(:func:`timm_fmd.stages.feature_stages`):
a skip site belongs to the stage its block runs in, a conv site to the stage its convolution runs in
(its norm or activation may come after the stage's feature module, as NF-RegNet's ``final_act``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .stages import feature_stages, probe_input_size

__all__ = ['Site', 'find_sites']

_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__radd__,
         torch.Tensor.__iadd__}
_MULS = {'mul', 'mul_', '__mul__', '__rmul__', '__imul__'}
_ACT_MODULES = ('torch.nn.modules.activation', 'timm.layers.activations', 'timm.layers.activations_me')


@dataclass(frozen=True)
class Site:
    """One place where the op is applied.

    Attributes:
        path: module path of the site: the empty slot replaced by the op (``slot=True``), or the
            module whose output a forward hook distorts.
        kind: ``'conv'`` or ``'skip'``.
        stage: the feature_info index of the stage holding the site (non-negative).
        shape: the feature shape at the probe input, batch included (batch 1).
        layout: ``'NCHW'``, ``'NHWC'``, ``'NLC'``, ``'NCL'`` or ``'NC'``.
        next_layer: module path of the layer consuming the site's output, or ``None``.
        slot: True when ``path`` is an existing empty slot the op replaces.
    """

    path: str
    kind: str
    stage: int
    shape: Tuple[int, ...]
    layout: str
    next_layer: Optional[str]
    slot: bool


@dataclass
class _Node:
    """One recorded operation: its inputs' nodes and its (first) tensor output."""

    parents: Tuple[int, ...]
    shape: Tuple[int, ...]
    func: str


@dataclass
class _Call:
    """One module call: the nodes of its first tensor input and of its first tensor output."""

    path: str
    module: nn.Module
    start: int  # nodes recorded before the call began
    order: int  # hook tick at entry: a child enters after its parent even when no op ran between
    input: Optional[int] = None
    output: Optional[int] = None
    end: int = -1  # hook tick at exit


class _Recorder(TorchFunctionMode):
    """Builds the data-flow graph of one forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: List[_Node] = []
        self.node_of: Dict[int, int] = {}  # id(tensor) -> latest node that wrote it
        self.keep: List[torch.Tensor] = []  # keeps tensors alive so their ids stay unique
        self.calls: List[_Call] = []
        self.adds: List[Tuple[int, int, int]] = []  # (node of a, node of b, node of a + b)
        self.tick = 0  # counts module entries and exits

    def node(self, t: torch.Tensor) -> int:
        if id(t) not in self.node_of:  # a parameter, buffer or the model input: a source node
            self.nodes.append(_Node((), tuple(t.shape), 'source'))
            self.node_of[id(t)] = len(self.nodes) - 1
            self.keep.append(t)
        return self.node_of[id(t)]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if outputs:
            parents = tuple(self.node(t) for t in inputs)
            self.nodes.append(_Node(parents, tuple(outputs[0].shape), getattr(func, '__name__', str(func))))
            index = len(self.nodes) - 1
            for t in outputs:
                self.node_of[id(t)] = index
                self.keep.append(t)
            if func in _ADDS and len(inputs) == 2 and inputs[0].shape == inputs[1].shape == outputs[0].shape:
                self.adds.append((parents[0], parents[1], index))
        return out

    def pre_hook(self, path: str):
        def hook(module, args):
            self.tick += 1
            call = _Call(path, module, len(self.nodes), self.tick)
            first = next((t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)), None)
            if first is not None:
                call.input = self.node(first)
            self.calls.append(call)
            module._fmd_probe_calls = getattr(module, '_fmd_probe_calls', []) + [call]
        return hook

    def post_hook(self, module, args, output):
        call = module._fmd_probe_calls.pop()
        self.tick += 1
        call.end = self.tick
        if isinstance(output, torch.Tensor):  # a module returning a tuple cannot host a site
            call.output = self.node(output)

    # ------------------------------------------------------------------ graph queries
    def descends(self, node: int, ancestor: int) -> bool:
        """True when ``node`` is ``ancestor`` or computed from it (only nodes after it are searched)."""
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if n == ancestor:
                return True
            if n < ancestor or n in seen:
                continue
            seen.add(n)
            stack.extend(self.nodes[n].parents)
        return False

    def same_size_descendants(self, start: int) -> set:
        """Nodes computed from ``start`` through operations that keep its number of elements."""
        numel = _numel(self.nodes[start].shape)
        reach = {start}
        for i in range(start + 1, len(self.nodes)):
            node = self.nodes[i]
            if _numel(node.shape) == numel and any(p in reach for p in node.parents):
                reach.add(i)
        return reach

    def is_gate(self, start: int) -> bool:
        """True when the map at ``start`` only feeds, at its own resolution, a product with a larger map:
        the branch of an attention gate such as squeeze-and-excitation, computed on a pooled map."""
        shape = self.nodes[start].shape
        if len(shape) != 4:
            return False
        area = _numel(shape[2:])
        reach = {start}
        for i in range(start + 1, len(self.nodes)):
            node = self.nodes[i]
            if not any(p in reach for p in node.parents):
                continue
            if len(node.shape) == 4 and _numel(node.shape[2:]) == area:
                reach.add(i)
            elif node.func in _MULS and len(node.shape) == 4 and _numel(node.shape[2:]) > area:
                return True
        return False

    def view_chain(self, start: int) -> set:
        """``start`` and nodes reached from it by single-input, size-preserving ops (permute, reshape, ...)."""
        numel = _numel(self.nodes[start].shape)
        reach = {start}
        for i in range(start + 1, len(self.nodes)):
            node = self.nodes[i]
            if len(node.parents) == 1 and node.parents[0] in reach and _numel(node.shape) == numel:
                reach.add(i)
        return reach


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) or \
        'norm' in type(m).__name__.lower()


def _is_act(m: nn.Module) -> bool:
    return type(m).__module__ in _ACT_MODULES


def _is_producer(m: nn.Module, call: _Call, rec: _Recorder) -> bool:
    shape = rec.nodes[call.output].shape
    if isinstance(m, nn.Conv2d):
        return not rec.is_gate(call.output)
    return isinstance(m, nn.Linear) and len(shape) == 2


def _layout(shape: Tuple[int, ...], channels: Optional[int]) -> str:
    if len(shape) == 2:
        return 'NC'
    if len(shape) == 3:
        return 'NLC' if channels is None or shape[2] == channels else 'NCL'
    if channels is not None and shape[3] == channels and shape[1] != channels:
        return 'NHWC'
    return 'NCHW'


def _stage_spans(rec: _Recorder, names: List[Optional[str]], chosen: Sequence[int]) -> Dict[int, Tuple[int, int]]:
    """Tick span of each chosen stage: from the exit of the previous feature_info module to its own exit.

    Spans, not module paths, because timm's feature_info may name a container ('layer3') or a single
    layer of a flat Sequential ('features.15' in VGG). A stage the model lacks (``None``: cut off by
    a features_only wrapper) has no span.
    """
    def end(path: str) -> Optional[int]:
        # a stage may be a ModuleList that is never called itself: take the last exit inside it
        inside = [c.end for c in rec.calls if c.path == path or c.path.startswith(path + '.')]
        return max(inside) if inside else None

    spans = {}
    for index in chosen:
        if names[index] is None:
            continue
        until = end(names[index])
        if until is None:
            raise ValueError(f'feature_info stage {index} ({names[index]!r}) did not run in the probe forward')
        spans[index] = ((end(names[index - 1]) or 0) if index > 0 else 0, until)
    return spans


def _in_stage(call: _Call, spans: Dict[int, Tuple[int, int]]) -> Optional[int]:
    for index, (after, until) in spans.items():
        if after < call.order and call.end <= until:
            return index
    return None


def _record(model: nn.Module, input_size: Sequence[int]) -> _Recorder:
    modules = dict(model.named_modules())
    rec = _Recorder()
    handles = []
    for path, m in modules.items():
        if path:
            handles.append(m.register_forward_pre_hook(rec.pre_hook(path)))
            handles.append(m.register_forward_hook(rec.post_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad(), rec:
            torch.manual_seed(0)
            param = next(model.parameters(), None)
            device = param.device if param is not None else torch.device('cpu')
            try:
                model(torch.randn(1, *input_size, device=device))
            except Exception as e:
                raise ValueError(f'the probe forward that finds FMD sites failed for {type(model).__name__} at '
                                 f'input size {tuple(input_size)} ({type(e).__name__}: {e}); pass an input size '
                                 f'the model accepts as fmd_input_size=(C, H, W)') from e
    finally:
        for h in handles:
            h.remove()
        for m in modules.values():
            m.__dict__.pop('_fmd_probe_calls', None)
        model.train(was_training)
    return rec


def _is_slot(c: _Call) -> bool:
    """An empty regulariser slot the model left: an ``nn.Identity`` whose name contains ``drop``."""
    return isinstance(c.module, nn.Identity) and 'drop' in c.path.rsplit('.', 1)[-1]


def _conv_site(rec: _Recorder, producer: _Call, calls_after: List[_Call]) -> _Call:
    """The site call of one conv/linear producer: its norm, its activation, or itself.

    Itself also when the model put an empty slot directly on the conv's output (the pre-activation
    ResNet's ``drop_block1``, where the FMD authors put their op): the model's own choice wins.
    """
    chain = rec.view_chain(producer.output)
    consumers = [c for c in calls_after if c.input in chain]
    if consumers and _is_slot(consumers[0]):
        return producer
    consumer = next((c for c in consumers if not isinstance(c.module, nn.Identity)), None)
    if consumer is not None and (_is_norm(consumer.module) or _is_act(consumer.module)):
        return consumer
    return producer


def _slot_for(site: _Call, calls: List[_Call]) -> Optional[_Call]:
    """An empty ``drop`` slot right at the site: inside a fused norm-act, or called on the site's output."""
    for c in calls:
        if _is_slot(c):
            fused = _is_norm(site.module) and c.path.startswith(site.path + '.')
            if fused or c.input == site.output:
                return c
    return None


def _residual_adds(rec: _Recorder, call: _Call, calls: List[_Call], claimed: set) -> List[int]:
    """The residual adds inside ``call``: shortcut (the input, a direct child's output, or an earlier
    residual sum) plus a branch computed from the input through at least one conv/linear."""
    inside = [c for c in calls if c.order > call.order and c.start <= call.output and c.output <= call.output]
    children = {c.output for c in inside if c.path.rsplit('.', 1)[0] == call.path}
    weighted = [c.output for c in inside if isinstance(c.module, (nn.Conv2d, nn.Linear))]
    found = []
    for a, b, out in rec.adds:
        if out in claimed or not call.start <= out <= call.output or not rec.descends(call.output, out):
            continue
        for shortcut, branch in ((a, b), (b, a)):
            short_ok = shortcut == call.input or shortcut in children or shortcut in found
            if short_ok and rec.descends(branch, call.input) and any(rec.descends(branch, w) for w in weighted):
                found.append(out)
                break
    return found


def find_sites(
        model: nn.Module,
        stages: Sequence[int] = (-2, -1),
        kinds: Sequence[str] = ('conv', 'skip'),
        input_size: Optional[Sequence[int]] = None,
) -> List[Site]:
    """Find the FMD sites of ``model`` in the chosen feature_info ``stages`` (see the module docstring)."""
    names = feature_stages(model)
    n = len(names)
    for s in stages:
        if isinstance(s, bool) or not isinstance(s, int) or not -n <= s < n:
            raise ValueError(f'stage index {s!r} is out of range: {type(model).__name__} has {n} feature_info '
                             f'stages {names}; use -{n}..{n - 1}')
    rec = _record(model, input_size or probe_input_size(model))
    spans = _stage_spans(rec, names, sorted({s % n for s in stages}))
    counts: Dict[str, int] = {}
    for c in rec.calls:
        counts[c.path] = counts.get(c.path, 0) + 1
    # one call per module: a module that runs twice (weight sharing, a reused activation) is no site
    calls = [c for c in rec.calls if counts[c.path] == 1 and c.output is not None and c.input is not None]

    # path -> (kind, site call, the call deciding its stage: a conv site belongs to its conv's stage, also
    # where its norm or activation comes after the stage's feature module)
    found: Dict[str, Tuple[str, _Call, _Call]] = {}
    if 'conv' in kinds:
        for i, producer in enumerate(calls):
            if _is_producer(producer.module, producer, rec):
                site = _conv_site(rec, producer, calls[i + 1:])
                found.setdefault(site.path, ('conv', site, producer))
    if 'skip' in kinds:
        claimed: set = set()
        for call in sorted(calls, key=lambda c: -c.order):  # innermost (latest-starting) module first
            adds = _residual_adds(rec, call, calls, claimed)
            if adds:
                claimed.update(adds)
                found.setdefault(call.path, ('skip', call, call))

    sites = []
    for path, (kind, call, member) in sorted(found.items(), key=lambda item: item[1][1].start):
        stage = _in_stage(member, spans)
        if stage is None:
            continue
        slot = _slot_for(call, calls) if kind == 'conv' else None
        node = slot.input if slot is not None else call.output
        shape = rec.nodes[node].shape
        reach = rec.same_size_descendants(node)
        producer_channels = _producer_channels(rec, calls, node)
        layout = _layout(shape, producer_channels)
        channels = shape[layout.index('C')]
        next_path = None
        for c in calls:
            if c.start > node and c.input in reach and isinstance(c.module, (nn.Conv2d, nn.Linear)):
                fits = (c.module.in_channels if isinstance(c.module, nn.Conv2d) else c.module.in_features) == channels
                spatial_ok = isinstance(c.module, nn.Linear) or layout in ('NCHW', 'NHWC')
                if fits and spatial_ok:
                    next_path = c.path
                break
        sites.append(Site(path=slot.path if slot else path, kind=kind, stage=stage, shape=shape, layout=layout,
                          next_layer=next_path, slot=slot is not None))
    return sites


def _producer_channels(rec: _Recorder, calls: List[_Call], node: int) -> Optional[int]:
    """Output channels of the latest conv/linear whose output the node derives from."""
    for c in sorted(calls, key=lambda c: -c.start):
        if c.output is not None and c.output <= node and isinstance(c.module, (nn.Conv2d, nn.Linear)):
            if rec.descends(node, c.output):
                return c.module.out_channels if isinstance(c.module, nn.Conv2d) else c.module.out_features
    return None
