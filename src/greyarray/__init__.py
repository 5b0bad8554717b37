"""GreyArray: CIFTI-2 greyordinate maps to and from ModelArray's HDF5 layout."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("greyarray")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
