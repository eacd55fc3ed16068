"""atomuq: uncertainty quantification for machine-learned interatomic potentials.

Units everywhere follow ASE: eV, Å, eV/Å, eV/Å³, fs, K, amu.
"""

__version__ = "0.1.0"
