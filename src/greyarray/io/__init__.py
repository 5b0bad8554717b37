"""Files: CIFTI-2 in, the ModelArray HDF5 through, CIFTI-2 out; cohort CSVs; safe writes."""
