"""minidp: a readable NumPy + Numba Deep Potential (se_e2_a), cross-checked against deepmd-kit.

The package in layers, each importing only from itself and the layers below it (tests/test_layout.py):

- ``checks``, ``runtime``, ``kernels``: input validators, process settings, the Numba loops;
- the physics core: ``nn`` (nets and their derivatives), ``optim``, ``neighbor``, ``se_e2_a`` (the
  descriptor), ``compress`` (its tabulated embedding), ``model`` (fitting, energies, forces, virials),
  ``stats``;
- ``io``: model files (read, checked, written), systems, safe outputs, figures;
- ``infer``: :class:`DeepPot`, deepmd-kit's inference interface;
- ``training``, ``md`` (LAMMPS, i-PI, ASE, OpenMM) and ``active`` (ensembles, model deviation,
  neighbour statistics, bias changes, streamed labelling);
- ``cli``: the ``minidp`` command line.
"""

__version__ = "0.1.0"

from minidp.infer import DeepPot  # noqa: E402  (after __version__, which model files record)

__all__ = ["DeepPot", "__version__"]
