"""The training methods a run compares, as objects: what each needs of devices and twins, and what stands
where a physical layer stood.

``pat``: the physical forward pass, the twin's backward (every device replica gets a twin, with copies in
twin actors for the pipelined backward passes, and a drift watch). ``in_silico``: the twin both ways
(replica 0's twin alone; the devices are measured for the test). ``oracle``: the physical forward pass
and the exact derivative of the simulator (simulated devices only; no twin). ``ablation`` and
``digital``: the controls, with no device in the loop: each physical layer becomes a fixed random
orthogonal map (:class:`~pnn_cluster.layers.FixedMap`), or that map plus a trainable MLP with as many
parameters as the device has settings (:class:`~pnn_cluster.layers.DigitalStandIn`).

The runner asks the method; it never compares method names. A new method is a subclass here and an
entry in :data:`METHODS` (the configuration schema lists the same names).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

__all__ = ["Method", "PAT", "InSilico", "Oracle", "Ablation", "Digital", "METHODS", "method_for"]


class Method:
    """One training method. Class attributes say what it needs; physical methods set a layer ``mode``."""

    name: ClassVar[str]
    #: the mode of every physical layer (:data:`pnn_cluster.layers.MODES`); None: no physical layer at all
    mode: ClassVar[str | None] = None
    #: twin copies in twin actors, a drift watch: only for the backward pass that runs through twins
    twin_copies: ClassVar[bool] = False
    watches_twins: ClassVar[bool] = False

    @property
    def digital(self) -> bool:
        """The controls: physical layers replaced by digital stand-ins, no device measured."""
        return self.mode is None

    def needs_twin(self, replica: int) -> bool:
        """Whether device replica ``replica`` gets a twin (fitted, or restored from a checkpoint)."""
        return False

    @property
    def init_mode(self) -> str:
        """The layer mode the data-dependent initialisation runs in (what the method trains through)."""
        return "pat"

    @property
    def twin_only_evaluation(self) -> bool:
        """Whether ``evaluate`` can also report the twins' own accuracy (a method that trains with twins)."""
        return self.needs_twin(0)

    def stand_in(self, device_spec: Any, name: str, seed: int) -> nn.Module:
        """The digital layer in place of a physical one (digital methods only)."""
        raise TypeError(f"method {self.name!r} keeps its physical layers")


class PAT(Method):
    name = "pat"
    mode = "pat"
    twin_copies = True
    watches_twins = True

    def needs_twin(self, replica: int) -> bool:
        return True


class InSilico(Method):
    name = "in_silico"
    mode = "in_silico"

    def needs_twin(self, replica: int) -> bool:
        return replica == 0  # trains on replica 0's twin alone

    @property
    def init_mode(self) -> str:
        return "in_silico"


class Oracle(Method):
    name = "oracle"
    mode = "oracle"


class Ablation(Method):
    name = "ablation"

    def stand_in(self, device_spec: Any, name: str, seed: int) -> nn.Module:
        from pnn_cluster.layers import FixedMap

        return FixedMap(device_spec.input.size, device_spec.output.size, name=name, seed=seed)


class Digital(Method):
    name = "digital"

    def stand_in(self, device_spec: Any, name: str, seed: int) -> nn.Module:
        import numpy as np

        from pnn_cluster.layers import DigitalStandIn

        port = device_spec.input
        n_params = sum(int(np.prod(p.shape)) for p in device_spec.params)
        return DigitalStandIn(port.size, device_spec.output.size, n_params, name=name,
                              center=(port.low + port.high) / 2, seed=seed)


#: every method by its configuration name
METHODS: dict[str, Method] = {m.name: m for m in (PAT(), InSilico(), Oracle(), Ablation(), Digital())}


def method_for(name: str) -> Method:
    """The method a configuration names (the schema has already checked the name)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method: {name!r} is not one of {', '.join(METHODS)}") from None
