"""Build learners by name: ``make_learner("lr", bits=20)``.

A registered factory is a callable or a lazy ``"module:attribute"`` string, imported on
first use, so listing names or building ``"ctr"`` never imports torch. The two-tower
family (``"two-tower"``, ``"inttower"``, ``"dat"``) is registered here lazily as
``learners.two_tower:make`` with its name bound; other packages add theirs with
:func:`register`.

>>> sorted(set(available()) & {"ctr", "lr", "river-lr"})
['ctr', 'lr', 'river-lr']
>>> make_learner("ctr", half_life=500).spec
{'name': 'ctr', 'params': {'half_life': 500.0, 'time_unit': 'events', 'prior_strength': 20.0, 'key': 'item_id', 'time_key': 'ctx:event_time'}}
>>> make_learner("nope")
Traceback (most recent call last):
...
streams.errors.ConfigError: unknown learner 'nope'; available: ...
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Mapping, Union

from streams.errors import ConfigError

__all__ = ["make_learner", "available", "register", "Factory"]

Factory = Union[Callable[..., Any], str]

_FACTORIES: dict[str, tuple[Factory, dict[str, Any]]] = {}
_RESOLVED: dict[str, Callable[..., Any]] = {}


def register(name: str, factory: Factory, *, bind: Mapping[str, Any] | None = None, replace: bool = False) -> None:
    """Make ``make_learner(name, **params)`` call ``factory(**bind, **params)``.

    ``factory`` is a callable or a ``"package.module:attribute"`` string imported on
    first use; ``bind`` holds keyword arguments always passed (e.g. the name, for a
    factory serving several names). Registering a taken name raises ``ValueError``
    unless ``replace=True`` (the same registration again is accepted, so a module that
    registers may be imported twice).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a learner name must be a non-empty string, got {name!r}")
    if isinstance(factory, str):
        if ":" not in factory:
            raise ValueError(f"a lazy factory is 'module:attribute', got {factory!r}")
    elif not callable(factory):
        raise ValueError(f"factory for {name!r} must be callable or 'module:attribute', got {factory!r}")
    entry = (factory, dict(bind or {}))
    old = _FACTORIES.get(name)
    if old is not None and old != entry and not replace:
        raise ValueError(f"learner {name!r} is already registered ({old[0]!r}); pass replace=True to override")
    _FACTORIES[name] = entry
    _RESOLVED.pop(name, None)


register("ctr", "learners.ctr:CTRLearner")
register("lr", "learners.linear:HashedLogisticRegression")
register("river-lr", "learners.river_lr:RiverLogisticRegression")
for _name in ("two-tower", "inttower", "dat"):
    register(_name, "learners.two_tower:make", bind={"name": _name})


def available() -> list[str]:
    """Names that :func:`make_learner` accepts, sorted."""
    return sorted(_FACTORIES)


def _resolve(name: str) -> Callable[..., Any]:
    factory = _RESOLVED.get(name)
    if factory is None:
        target = _FACTORIES[name][0]
        if isinstance(target, str):
            module_name, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module_name), attr)
        factory = _RESOLVED[name] = target
    return factory


def make_learner(name: str, **params: Any) -> Any:
    """A new learner ``name`` built with ``params`` (e.g. from a checkpoint's ``spec``).

    Raises
    ------
    ConfigError
        When ``name`` is unknown or ``params`` do not fit the learner.
    """
    if name not in _FACTORIES:
        raise ConfigError(f"unknown learner {name!r}; available: {', '.join(sorted(_FACTORIES))}")
    factory = _resolve(name)
    params = {**_FACTORIES[name][1], **params}
    try:
        inspect.signature(factory).bind(**params)
    except TypeError as exc:
        raise ConfigError(f"bad parameters for learner {name!r}: {exc}") from None
    except ValueError:  # no signature available (a builtin): let the call decide
        pass
    try:
        return factory(**params)
    except ValueError as exc:
        raise ConfigError(f"bad parameters for learner {name!r}: {exc}") from exc
