"""A user's own :class:`~pnn_cluster.devices.base.Device` class, named by import path.

A lab names its device class as ``"package.module:ClassName"`` (a nested
class as ``"module:Outer.Inner"``) and its constructor options as a mapping,
in a configuration file or on the command line (``serve-device --device``).
The module must be importable where the device runs: installed on that
machine, or on its ``PYTHONPATH`` (for Ray, e.g. the job's runtime
environment). Constructing does no I/O, as for every device; ``connect()``
does.

Every mistake is one :class:`UserDeviceError` line naming the path, what
went wrong and what is allowed.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Mapping
from typing import Any

from pnn_cluster.devices.base import Device

__all__ = ["UserDeviceError", "load_device_class", "make_user_device"]

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_PATH = re.compile(rf"({_IDENT}(?:\.{_IDENT})*):({_IDENT}(?:\.{_IDENT})*)")
ALLOWED_PATH = "'package.module:ClassName', a Device subclass importable where the device runs"


class UserDeviceError(ValueError):
    """A user's device class could not be loaded or constructed; the message says why and what is allowed."""

    def __init__(self, path: str, problem: str, allowed: str) -> None:
        self.path = path
        self.problem = " ".join(problem.split())  # one line, whatever the user's exception said
        self.allowed = allowed
        super().__init__(f"device class {path!r}: {self.problem}; allowed: {allowed}")


def load_device_class(path: str) -> type[Device]:
    """The :class:`Device` subclass named ``"package.module:ClassName"``, imported."""
    m = _PATH.fullmatch(path) if isinstance(path, str) else None
    if m is None:
        raise UserDeviceError(str(path), "not an import path of the form module:ClassName", ALLOWED_PATH)
    module_name, qualname = m.groups()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UserDeviceError(path, f"module {module_name!r} not found on this machine (not installed and "
                                        "not on PYTHONPATH)", ALLOWED_PATH) from None
        raise UserDeviceError(path, f"importing module {module_name!r} failed: {exc}",
                              "a module whose own imports succeed (dependencies installed here)") from exc
    except Exception as exc:  # a SyntaxError or an error at the module's top level
        raise UserDeviceError(path, f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}",
                              "a module that imports cleanly") from exc
    obj: Any = module
    for i, part in enumerate(qualname.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            where = module_name if i == 0 else f"{module_name}:{'.'.join(qualname.split('.')[:i])}"
            found = sorted(n for n, v in getattr(obj, "__dict__", {}).items()
                           if isinstance(v, type) and issubclass(v, Device)
                           and v is not Device and getattr(v, "__module__", None) == module.__name__)
            listed = f"one of the Device classes there: {', '.join(found)}" if found else f"a Device class in {where}"
            raise UserDeviceError(path, f"{where} has no attribute {part!r}", listed) from None
    if not (isinstance(obj, type) and issubclass(obj, Device)):
        what = f"class {obj.__name__}" if isinstance(obj, type) else f"a {type(obj).__name__}"
        raise UserDeviceError(path, f"is {what}, not a subclass of pnn_cluster.devices.Device",
                              "a class derived from pnn_cluster.devices.Device")
    if obj is Device:
        raise UserDeviceError(path, "is the Device base class itself", "a subclass that implements measure()")
    return obj


def make_user_device(path: str, options: Mapping[str, Any] | None = None) -> Device:
    """Construct the class at ``path`` with ``options`` as keyword arguments (no I/O: connect() does that)."""
    cls = load_device_class(path)
    options = {} if options is None else options
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise UserDeviceError(path, f"options must be a mapping of name to value, got {options!r}",
                              "{option: value, ...}")
    signature = _signature(cls)
    shown = f"{cls.__name__}{signature}" if signature is not None else f"{cls.__name__}(...)"
    if signature is not None:
        try:
            signature.bind(**options)
        except TypeError as exc:
            raise UserDeviceError(path, f"the constructor refuses the options {dict(options)}: {exc}",
                                  f"keyword arguments of {shown}") from None
    try:
        device = cls(**options)
    except Exception as exc:
        raise UserDeviceError(path, f"constructing with options {dict(options)} failed: "
                                    f"{type(exc).__name__}: {exc}", f"values {shown} accepts") from exc
    return device


def _signature(cls: type) -> inspect.Signature | None:
    """The constructor's signature, annotations evaluated where they can be (``size: int``, not ``'int'``)."""
    for eval_str in (True, False):
        try:
            return inspect.signature(cls, eval_str=eval_str).replace(return_annotation=inspect.Signature.empty)
        except (TypeError, ValueError, NameError, AttributeError):  # unresolvable annotations, or a C constructor
            continue
    return None
