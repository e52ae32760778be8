"""The registry behind ``--codec NAME``.

Built-in codecs are named in a table here (``_BUILTIN``: codec name -> the module whose
``CODECS`` mapping holds its factory), so no codec module imports the registry; other
packages add theirs through the ``ratefit.codecs`` entry point group (the entry point names
a factory taking keyword options and returning a Codec) or with ``register``. Factories, not instances, are registered: a codec may hold
a model on a GPU and must be built inside the worker that uses it.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, Callable

from ratefit.codecs.base import Codec, capabilities_of

Factory = Callable[..., Codec]
_FACTORIES: dict[str, Factory] = {}
_entry_points_loaded = False
# Built-in codecs and the module defining each; a module is imported when one of its codecs
# is first asked for, so a job with a classical codec never pays for torch and compressai
# (seconds) in its driver or workers.
_BUILTIN = {"jpeg": "ratefit.codecs.pillow", "webp": "ratefit.codecs.pillow", "avif": "ratefit.codecs.pillow",
            "jxl": "ratefit.codecs.jxl", "jxl-lossless": "ratefit.codecs.jxl",
            "gain-hyperprior": "ratefit.codecs.gain_hyperprior",
            "gain-hyperprior-roi": "ratefit.codecs.gain_hyperprior_roi", "qarv": "ratefit.codecs.qarv"}
# CompressAI's zoo (``codecs/zoo.py``); named here so listing them does not import torch.
ZOO_NAMES = ("bmshj2018-hyperprior", "mbt2018-mean", "bmshj2018-hyperprior-vbr", "mbt2018-mean-vbr",
             "mbt2018", "cheng2020-anchor", "cheng2020-attn")
_BUILTIN.update({f"compressai:{n}": "ratefit.codecs.zoo" for n in ZOO_NAMES})


def register(name: str, factory: Factory) -> None:
    if (name in _FACTORIES and _FACTORIES[name] is not factory) or name in _BUILTIN:
        raise ValueError(f"codec {name!r} is already registered")
    _FACTORIES[name] = factory


def _load_builtin_and_plugins() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    for ep in entry_points(group="ratefit.codecs"):
        if ep.name not in _FACTORIES and ep.name not in _BUILTIN:   # built-in names win
            _FACTORIES[ep.name] = ep.load()
    _entry_points_loaded = True


def factory_of(name: str) -> Factory:
    """The factory registered as ``name`` (importing a built-in's module on first use).

    Raises KeyError listing the known names.
    """
    _load_builtin_and_plugins()
    if name not in _FACTORIES and name in _BUILTIN:
        codecs = import_module(_BUILTIN[name]).CODECS
        _FACTORIES.update({n: codecs[n] for n, module in _BUILTIN.items() if module == _BUILTIN[name]})
    if name in _FACTORIES:
        return _FACTORIES[name]
    if name.startswith("compressai:"):
        raise KeyError(f"unknown codec {name!r}; CompressAI zoo models ratefit runs: "
                       f"{', '.join('compressai:' + n for n in ZOO_NAMES)}")
    raise KeyError(f"unknown codec {name!r}; known codecs: {', '.join(list_codecs())}")


def get_codec(name: str, **options: Any) -> Codec:
    """Build the codec registered as ``name``; raises KeyError listing the known names."""
    return factory_of(name)(**options)


def preferred_device(name: str, **options: Any) -> str:
    """Where codec ``name`` wants to run ("cpu" or "cuda").

    Read from the factory's declared capabilities (a codec class's ``capabilities``), so a
    job's driver need not load a model just to size its actor pool; a factory that declares
    nothing (a plugin) is built once to ask.
    """
    factory = factory_of(name)
    device = capabilities_of(factory).preferred_device
    if device is not None:
        return device
    codec = factory(**options)
    return capabilities_of(codec).preferred_device or codec.device


def accepts_option(name: str, option: str) -> bool:
    """Whether the factory of ``name`` takes keyword ``option`` (False for unknown names)."""
    import inspect

    try:
        params = inspect.signature(factory_of(name)).parameters.values()
    except (KeyError, TypeError, ValueError):
        return False
    return any(p.name == option or p.kind is p.VAR_KEYWORD for p in params)


def list_codecs() -> list[str]:
    _load_builtin_and_plugins()
    return sorted(set(_FACTORIES) | set(_BUILTIN))


def describe(name: str) -> dict[str, Any]:
    """What ``ratefit codecs`` shows for ``name``: control, range, kind, device, speed, extension.

    A factory with a ``describe()`` method answers without being built (codecs that need
    weights the user has not given); any other codec is built with default options.
    """
    factory = factory_of(name)
    if callable(getattr(factory, "describe", None)):
        return factory.describe()
    c = factory()
    ctl = c.control
    return {"control": ctl.name, "range": f"{ctl.low:g}..{ctl.high:g}",
            "kind": "discrete" if ctl.discrete else "continuous",
            "device": capabilities_of(c).preferred_device or c.device, "speed": c.speed, "extension": c.extension}
