"""dpdata's driver ``"minidp"``: label a dpdata System with a minidp model.

.. code-block:: python

    import dpdata

    system = dpdata.System("POSCAR", fmt="vasp/poscar")
    labelled = system.predict("model.dp", driver="minidp")  # or a minidp.DeepPot
    relaxed = system.minimize(driver=dpdata.driver.Driver.get_driver("minidp")("model.dp"), minimizer="ase")

minidp's ``pyproject.toml`` names :class:`MiniDPDriver` in the entry-point
group ``dpdata.plugins``, which dpdata loads on every ``import dpdata``: this
module therefore stands beside the package, not in it (importing anything of
``minidp`` runs the package's ``__init__``, which loads DeepPot, Numba and all:
0.24 s of every ``import dpdata`` that nobody asked for), imports only dpdata
and NumPy at the top, and imports minidp when a driver is made. The labels are deepmd-kit's "dp" driver's:
energies (nf,), forces (nf, natoms, 3) and virials (nf, 3, 3), the system's
atoms matched to the model's types by element name.
"""

from __future__ import annotations

import numpy as np
from dpdata.driver import Driver
from dpdata.utils import sort_atom_names


@Driver.register("minidp")
class MiniDPDriver(Driver):
    """minidp as a dpdata driver.

    Parameters
    ----------
    dp : a model file (any format minidp.DeepPot reads), or a minidp.DeepPot
        (anything with ``eval`` and ``get_type_map``)
    fparam, aparam : the frame and atomic parameters of a model that takes them,
        in any shape DeepPot.eval accepts (the same for every frame labelled)
    deeppot_options : passed to minidp.DeepPot when ``dp`` is a file (batch_size, workers, backend, ...)
    """

    def __init__(self, dp, fparam=None, aparam=None, **deeppot_options) -> None:
        if not (hasattr(dp, "eval") and hasattr(dp, "get_type_map")):
            # here, not at the top: dpdata imports this module on every `import dpdata`, and
            # minidp brings Numba with it (import time nobody asked for); the one lazy import of minidp
            from minidp.infer import DeepPot

            dp = DeepPot(dp, **deeppot_options)
        elif deeppot_options:
            raise TypeError(f"options {sorted(deeppot_options)} are for a model file; dp is already a DeepPot")
        self.dp, self.fparam, self.aparam = dp, fparam, aparam

    def label(self, data: dict) -> dict:
        """The system's data with the model's energies (nf,), forces (nf, natoms, 3), virials (nf, 3, 3)."""
        nf, natoms = data["coords"].shape[:2]
        # the model's numbering of the atoms' types; the returned data keeps the system's own
        types = sort_atom_names(data.copy(), type_map=self.dp.get_type_map())["atom_types"]
        # (nf, natoms * 3), (nf, 9) or None
        coords = np.asarray(data["coords"]).reshape(nf, natoms * 3)
        cells = None if data.get("nopbc", False) else np.asarray(data["cells"]).reshape(nf, 9)
        e, f, v = self.dp.eval(coords, cells, types, fparam=self.fparam, aparam=self.aparam)[:3]
        data = data.copy()
        data["energies"] = e.reshape(nf)
        data["forces"] = f.reshape(nf, natoms, 3)
        data["virials"] = v.reshape(nf, 3, 3)
        return data
