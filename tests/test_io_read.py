"""Reading structure files: compressed extended XYZ is read from memory, the same frames as the plain file."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator

from atomuq.core.errors import InputError
from atomuq.core.io import read_structures, reference_forces, write_structures


def labelled_frames(n: int) -> list:
    rng = np.random.default_rng(3)
    frames = []
    for k in range(n):
        atoms = molecule("CH3CH2OH")
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        atoms.info.update(split="train", frame=k, note="run[1]")
        atoms.calc = SinglePointCalculator(atoms, energy=-10.0 - k, forces=rng.normal(size=(len(atoms), 3)))
        frames.append(atoms)
    return frames


@pytest.mark.parametrize("suffix", [".extxyz.gz", ".extxyz.xz", ".xyz.bz2"])
def test_compressed_files_read_the_same_frames_labels_and_info_as_plain(tmp_path, suffix):
    frames = labelled_frames(30)
    plain = read_structures([write_structures(tmp_path / "plain.extxyz", frames)])
    packed = read_structures([write_structures(tmp_path / f"packed{suffix}", frames)])
    assert len(packed) == len(plain) == 30
    for a, b in zip(plain, packed):
        assert np.array_equal(a.atoms.positions, b.atoms.positions) and a.atoms.info == b.atoms.info
        assert np.array_equal(reference_forces(a.atoms), reference_forces(b.atoms))
        assert a.atoms.get_potential_energy() == b.atoms.get_potential_energy()
    assert [r.index for r in packed] == list(range(30)) and packed[4].where.endswith(f"packed{suffix} structure 4")


def test_a_truncated_compressed_file_is_refused_naming_it(tmp_path):
    path = write_structures(tmp_path / "frames.extxyz.gz", labelled_frames(5))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(InputError, match=r"frames\.extxyz\.gz: cannot read structures"):
        read_structures([path])


def test_a_gzip_file_that_is_not_text_is_refused_naming_it(tmp_path):
    path = tmp_path / "blob.extxyz.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(bytes(range(256)) * 4)
    with pytest.raises(InputError, match=r"blob\.extxyz\.gz: cannot read structures"):
        read_structures([path])
