"""Readers and writers of the files GreyArray converts and exports: CIFTI-2 (``cifti``, with the
hardened XML checks of ``ciftixml`` and the NIfTI-2 header of ``nifti2``)."""
