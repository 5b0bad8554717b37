"""Readers and writers of the files GreyArray converts and exports: CIFTI-2 (``cifti``, with the
hardened XML checks of ``ciftixml`` and the NIfTI-2 header of ``nifti2``), NIfTI-1/2 volumes
(``nifti``), MRtrix images (``mif``); ``stream`` reads plain and gzip-compressed files once.

``data_type`` tells a file's type from its name, as ModelArrayIO 26 does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from greyarray.errors import DataError, UsageError
from greyarray.io import inputs

if TYPE_CHECKING:
    from greyarray.io.spaces import ElementSpace, FixelSet, VoxelGrid

CIFTI_EXTENSIONS = (".dscalar.nii", ".pscalar.nii", ".pconn.nii")
# every CIFTI-2 file type: read as CIFTI, so that an unsupported one is named as such
CIFTI_TYPES = ("dtseries", "ptseries", "dlabel", "plabel", "dconn", "pdconn", "dpconn", "dfan")
NAMES = {"cifti": "CIFTI-2", "nifti": "NIfTI", "mif": "MRtrix fixel data"}


def data_type(path: str, sniff: bool = False) -> str:
    """``cifti``, ``mif`` or ``nifti`` from a file name (ModelArrayIO's rule); a name with none
    of their endings is read as CIFTI-2 (whose header then tells what it is). With ``sniff``, a
    plain ``.nii`` whose header is CIFTI-2's (NIfTI-2 with a CIFTI intent) is CIFTI."""
    name = str(path)
    if name.endswith(CIFTI_EXTENSIONS) or name.endswith(tuple(f".{t}.nii" for t in CIFTI_TYPES)):
        return "cifti"
    if name.endswith((".mif", ".mif.gz")):
        return "mif"
    if name.endswith(".nii") and sniff and _cifti_header(name):
        return "cifti"
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    return "cifti"


def _cifti_header(path: str) -> bool:
    """Whether a file starts with a NIfTI-2 header of a CIFTI intent (3000-3099)."""
    import struct

    try:
        with inputs.open_regular(Path(path)) as (fd, stamp):
            head = inputs.pread_exact(fd, 540, 0, Path(path)) if stamp.size >= 540 else b""
    except (OSError, DataError):
        return False
    for order in "<>":
        if len(head) == 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            return 3000 <= struct.unpack(order + "i", head[504:508])[0] < 3100
    return False


@dataclass(frozen=True)
class SpaceFiles:
    """The files that define a space other than a CIFTI file's own: ModelArrayIO's ``--mask``
    (NIfTI) and ``--index-file`` / ``--directions-file`` (fixels)."""

    mask: Path | None = None
    index_file: Path | None = None
    directions_file: Path | None = None

    @property
    def paths(self) -> list[Path]:
        return [p for p in (self.mask, self.index_file, self.directions_file) if p is not None]

    def load(self, data_type: str, where: str, required: bool = True) -> ElementSpace | None:
        """The space these files define for ``data_type`` (None: CIFTI, or none given when not
        ``required``); ``where`` says what holds that type, for messages ("the cohort lists")."""
        wanted = {"nifti": ("mask",), "mif": ("index_file", "directions_file"), "cifti": ()}
        given = [f for f in ("mask", "index_file", "directions_file") if getattr(self, f)]
        needed = wanted[data_type]
        names = {"cifti": "CIFTI-2 files", "nifti": "NIfTI maps", "mif": "MRtrix fixel data"}
        extra = [f for f in given if f not in needed]
        if extra:
            flag = "--" + extra[0].replace("_", "-")
            purpose = "NIfTI data" if extra[0] == "mask" else "fixel data"
            raise UsageError(f"{flag} is for {purpose}; {where} {names[data_type]}")
        missing = [f for f in needed if f not in given]
        if missing and (required or given):
            flags = " and ".join("--" + f.replace("_", "-") for f in missing)
            what = "the group mask" if data_type == "nifti" else "the fixel index and directions"
            raise UsageError(f"{where} {names[data_type]}: give {what} with {flags}")
        if not given:
            return None
        inputs.check_present(self.paths)
        if data_type == "nifti":
            return group_mask(self.mask)
        if data_type == "mif":
            return fixel_index(self.index_file, self.directions_file)
        return None


def group_mask(path: Path) -> VoxelGrid:
    """The voxels of a group mask (> 0), ModelArrayIO's ``--mask``."""
    from greyarray.io.formats import nifti
    from greyarray.io.spaces import VoxelGrid

    volume = nifti.read_volume(path)
    head = nifti.result_header(volume.header)
    inside = volume.positive().reshape(volume.shape, order="F")
    return VoxelGrid.from_mask(volume.shape, volume.affine, inside, head, str(path))


def fixel_index(index: Path, directions: Path) -> FixelSet:
    """The fixels of an MRtrix fixel directory's index and directions images."""
    from greyarray.io.formats import mif
    from greyarray.io.spaces import FixelSet

    files = tuple((Path(p).name, _file_bytes(p)) for p in (index, directions))
    return FixelSet.from_index(mif.read_image(index), mif.read_image(directions), files, str(index))


def _file_bytes(path: Path) -> bytes:
    from greyarray.io.formats.stream import MAX_DATA_BYTES

    with inputs.open_regular(path) as (fd, stamp):
        if stamp.size > MAX_DATA_BYTES:
            raise DataError(f"{path}: larger than any fixel index or directions file")
        return inputs.pread_exact(fd, stamp.size, 0, path)
