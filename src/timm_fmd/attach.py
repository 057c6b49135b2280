"""Where each FMD op sits in a model, and keeping it there when the model changes.

An op is attached at its site (:class:`timm_fmd.sites.Site`) in one of two ways:

* **slot** -- it replaces the empty ``nn.Identity`` the model left at the site
  (``BatchNormAct2d.drop``, ResNet's ``drop_block``);
* **hook** -- it becomes the ``fmd`` child of the site module, and a forward hook applies it to
  that module's output. The hook runs before the module's other forward hooks, so hooks that
  read the output (timm's ``FeatureHookNet``) see the distorted map, as the next layer does.

The model FMD was applied to, the *root*, lists its ops in ``_fmd_ops`` (a plain attribute: no
``state_dict`` key; a deep copy such as an EMA model gets its own list of its own ops). Users change
models after FMD is in -- they freeze or convert norms, swap heads, prune blocks -- and
:func:`sync` brings the list and the attachments back in line with the model as it is now:

* an op still in the model stays where it is: a hook that a conversion dropped
  (``convert_sync_batchnorm`` keeps children, not hooks) is re-installed, and the site's path
  follows a module that moved;
* an op no longer in the model follows its site by module path: into the module now at that path
  (``freeze_batch_norm_2d`` puts a ``FrozenBatchNorm2d`` where the ``BatchNorm2d`` was), or into
  the empty slot now there;
* its next layer likewise: the linked layer where it still is in the model, else the ``Conv2d`` /
  ``Linear`` now at that path if it accepts the site's channels (``reset_classifier``'s new
  classifier), else none -- the op falls back to the authors' fixed weight 0.01 -- with a warning;
* a site that cannot be followed (its path is gone, or its slot now holds another module) is lost:
  a warning names it, and it leaves the list.

The root's forward pre-hook :class:`SiteGuard` runs a cheap check before every eager training
forward (each op at its path, with its hook, linked to the layer at its next path) and the full
:func:`sync` only when that check fails; under ``torch.compile`` it runs once per trace, so the
graph is traced from the synced model. ``timm_fmd.reapply_fmd(model)`` runs :func:`sync` at once.
"""
from __future__ import annotations

import dataclasses
import itertools
import warnings
import weakref
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import torch
import torch.nn as nn

from .ops.distortion import FeatureMapDistortion
from .ops.next_layer import NextLayer

__all__ = ['SiteHook', 'SiteGuard', 'attach', 'detach', 'fmd_roots', 'in_place', 'sync']

FMD_CHILD = 'fmd'  # the child name of a hook-attached op
OPS = '_fmd_ops'  # the root's attribute listing its ops


class SiteHook:
    """Forward hook: distort the module's output with its ``fmd`` child. Stateless, so deep copies
    (EMA) and module conversions keep working.

    A module may carry the hook without the child: ``torch.ao.quantization.fuse_modules`` moves a fused
    norm's hooks onto the fused conv, whose output is left alone (FMD follows the site to the module
    at the norm's path, and :func:`sync` removes the stray hook).
    """

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        op = module._modules.get(FMD_CHILD)
        return output if op is None else op(output)


class SiteGuard:
    """Forward pre-hook on the root: before a training forward, bring FMD in line with the model.

    Eager: :func:`in_place` each time, :func:`sync` when it fails. Compiled: once per trace, eagerly at
    trace time (``assume_constant_result``: no graph break, so ``fullgraph=True`` holds), so the graph
    is traced from the synced model -- timm's ``train.py --sync-bn --torchcompile`` converts the norms,
    dropping FMD's hooks, right before compiling. The trace-time call takes the root's ``id`` and finds
    the root in a weak registry: torch 2.11's dynamo cannot pass a module to such a call (it can take its
    ``id``), so the guard registers its root when made, on every eager call and when deep-copied with it.
    """

    def __init__(self, root: nn.Module) -> None:
        self.root_id = id(root)
        _ROOTS[self.root_id] = root

    def __call__(self, model: nn.Module, args: Any) -> None:
        if not model.training:
            return
        if torch.compiler.is_compiling():
            _ensure_while_tracing(id(model))
        else:
            _ROOTS[id(model)] = model  # a dict store: e.g. an unpickled model, registered before compiling
            _ensure(model)

    def __deepcopy__(self, memo: Dict[int, Any]) -> 'SiteGuard':
        # copy.deepcopy makes the root's copy (memo) before its hooks: register that copy (EMA, ...)
        root = memo.get(self.root_id)
        if root is None:  # the hook copied without its root: a guard for no root yet
            guard = SiteGuard.__new__(SiteGuard)
            guard.root_id = None
            return guard
        return SiteGuard(root)


_ROOTS: 'weakref.WeakValueDictionary[int, nn.Module]' = weakref.WeakValueDictionary()


def _ensure(model: nn.Module) -> bool:
    if not in_place(model):
        sync(model)
    return True


@torch.compiler.assume_constant_result
def _ensure_while_tracing(root_id: int) -> bool:
    model = _ROOTS.get(root_id)
    return True if model is None else _ensure(model)  # unknown (never run eagerly, not copied): as it is


def fmd_roots(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``(path, root)`` of every model inside ``model`` (itself included) that FMD was applied to."""
    for path, m in model.named_modules():
        if OPS in m.__dict__:
            yield path, m


def attach(root: nn.Module, op: FeatureMapDistortion) -> None:
    """Put ``op`` at its site ``op.site`` in ``root`` and list it (see the module docstring)."""
    if op.site.slot:
        _set_child(root, op.site.path, op)
    else:
        _hook(root.get_submodule(op.site.path), op)
    root.__dict__.setdefault(OPS, []).append(op)


def detach(root: nn.Module, op: FeatureMapDistortion) -> None:
    """Take ``op`` out of ``root``: its slot gets an empty ``nn.Identity`` back, its hook goes."""
    if op.site.slot:
        _set_child(root, op.site.path, nn.Identity())
    else:
        host = root.get_submodule(op.site.path)
        del host._modules[FMD_CHILD]
        _unhook(host)
    root.__dict__[OPS].remove(op)


def in_place(root: nn.Module) -> bool:
    """True when every listed op sits at its site with its hook, linked to the layer at its next path.

    The check before every training forward: dictionary lookups along each op's two paths, no walk
    over the model.
    """
    for op in root.__dict__[OPS]:
        site = op.site
        m = _resolve(root, site.path)
        if site.slot:
            if m is not op:
                return False
        elif m is None or m._modules.get(FMD_CHILD) is not op or not _hooked(m):
            return False
        if site.next_layer is not None and _resolve(root, site.next_layer) is not op.next_layer:
            return False
    return True


def sync(root: nn.Module) -> int:
    """Bring ``root``'s ops in line with the model as it is now (see the module docstring).

    Warns (``UserWarning``) naming every site lost and every next layer lost. Returns how many
    sites it re-attached, re-hooked or re-linked.
    """
    modules = list(root.named_modules())
    paths = {id(m): p for p, m in modules}
    others = tuple(p + '.' for p, m in modules if p and OPS in m.__dict__)  # FMD roots of their own
    changed, kept = 0, []
    for path, m in modules:
        if _hooked(m) and not isinstance(m._modules.get(FMD_CHILD), FeatureMapDistortion):
            _unhook(m)  # a hook without its op (moved by fuse_modules): nothing runs there
        if isinstance(m, FeatureMapDistortion) and getattr(m, 'site', None) is not None and \
                not path.startswith(others):
            where, held = _placement(root, path, m)
            if where is None:
                continue  # not where an op runs (not a slot, not a host's fmd child)
            if held is not None and not _hooked(held):
                held.register_forward_hook(SiteHook(), prepend=True)
                changed += 1
            if where != m.site.path:
                m.site = dataclasses.replace(m.site, path=where)
            kept.append(m)
    lost = []
    placed = {id(op) for op in kept}
    for op in root.__dict__[OPS]:
        if id(op) in placed:
            continue
        reason = _follow(root, op)
        if reason is None:
            kept.append(op)
            changed += 1
        elif reason:  # '' : another op (a copy) took this site and is listed instead
            lost.append(f'{op.site.path} ({reason})')
    unlinked = []
    for op in kept:
        outcome = _relink(root, op, paths)
        if outcome is True:
            changed += 1
        elif outcome:
            unlinked.append(outcome)
    order = {p: i for i, (p, _) in enumerate(root.named_modules())}
    root.__dict__[OPS] = sorted(kept, key=lambda op: order[op.site.path])
    if lost:
        warnings.warn(f'FMD lost {len(lost)} site(s) after the model changed; they will not run: {", ".join(lost)}')
    if unlinked:
        warnings.warn(f'FMD site(s) lost their next layer after the model changed and use the fixed weight '
                      f'0.01 instead: {", ".join(unlinked)}')
    return changed


# ----------------------------------------------------------------------------------------- helpers
def _resolve(root: nn.Module, path: str) -> Optional[nn.Module]:
    m = root
    for atom in path.split('.'):
        m = m._modules.get(atom)
        if m is None:
            return None
    return m


def _set_child(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition('.')
    setattr(root.get_submodule(parent), name, module)


def _hooked(host: nn.Module) -> bool:
    return any(isinstance(h, SiteHook) for h in host._forward_hooks.values())


def _unhook(host: nn.Module) -> None:
    for key in [k for k, h in host._forward_hooks.items() if isinstance(h, SiteHook)]:
        del host._forward_hooks[key]


def _hook(host: nn.Module, op: FeatureMapDistortion) -> None:
    host.add_module(FMD_CHILD, op)
    if not _hooked(host):
        host.register_forward_hook(SiteHook(), prepend=True)


def _placement(root: nn.Module, path: str, op: FeatureMapDistortion) -> Tuple[Optional[str], Optional[nn.Module]]:
    """Where an op found at ``path`` acts: ``(site path, hook host or None)``; ``(None, None)`` if nowhere."""
    if op.site.slot:
        return path, None
    host_path, _, name = path.rpartition('.')
    if name != FMD_CHILD or not host_path:
        return None, None
    return host_path, root.get_submodule(host_path)


def _follow(root: nn.Module, op: FeatureMapDistortion) -> Optional[str]:
    """Attach an op that left the model to the module now at its site's path.

    Returns ``None`` when attached, ``''`` when another FMD op already holds the site, else why not.
    """
    path = op.site.path
    m = _resolve(root, path)
    if m is None:
        return 'its module is gone'
    if op.site.slot:
        if isinstance(m, FeatureMapDistortion):
            return ''
        if type(m) is not nn.Identity:
            return f'its slot now holds {type(m).__name__}'
        _set_child(root, path, op)
    else:
        held = m._modules.get(FMD_CHILD)
        if isinstance(held, FeatureMapDistortion):
            return ''
        if held is not None:
            return f'{type(m).__name__} has a child of its own named {FMD_CHILD!r}'
        _hook(m, op)
    # it was out of the model when the model last changed mode or device
    op.train(root.training)
    ref = next(itertools.chain(root.parameters(), root.buffers()), None)
    if ref is not None:
        op.to(ref.device)
    return None


def _relink(root: nn.Module, op: FeatureMapDistortion, paths: Dict[int, str]) -> Union[bool, str]:
    """Check an op's next layer. Returns False (unchanged), True (re-linked) or why the link is lost."""
    site = op.site
    if site.next_layer is None:
        return False
    linked = op.next_layer
    if id(linked) in paths:  # still in the model, perhaps at another path
        if paths[id(linked)] != site.next_layer:
            op.site = dataclasses.replace(site, next_layer=paths[id(linked)])
        return False
    m = _resolve(root, site.next_layer)
    reason = None
    if m is None:
        reason = 'is gone'
    else:
        try:
            layer = NextLayer(m)
            layer.check_fits(site.shape[site.layout.index('C')], len(site.layout) - 2)
        except (TypeError, ValueError) as e:
            reason = f'is now {type(m).__name__}: {e}'
    if reason is not None:
        op.link(None)
        op.site = dataclasses.replace(site, next_layer=None)
        return f'{site.path} (next layer {site.next_layer} {reason})'
    op.link(layer)
    inner = next(p for p, x in m.named_modules(prefix=site.next_layer) if x is layer.module)
    op.site = dataclasses.replace(site, next_layer=inner)
    return True
