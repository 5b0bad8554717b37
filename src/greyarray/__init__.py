"""GreyArray: CIFTI-2 greyordinate maps to and from ModelArray's HDF5 layout."""


def __getattr__(name: str) -> str:
    """``__version__``, read from the installed metadata on first use: importlib.metadata
    costs ~12 ms, which commands that never print the version need not pay."""
    if name != "__version__":
        raise AttributeError(f"module 'greyarray' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("greyarray")
    except PackageNotFoundError:  # running from a source tree that was not installed
        found = "0+unknown"
    globals()["__version__"] = found
    return found
