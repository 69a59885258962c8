"""The molecular-dynamics engines minidp drives: LAMMPS, i-PI and ASE."""
