# Open HDF5 files as ModelArray does, with R's HDF5 1.10 stack, without h5clear.
#
#   Rscript modelarray_open.R SCALAR FILE.h5 ...
#
# For each file: ModelArray()'s reads (rhdf5: scalars/<s>/values and its column names, every
# results/<a>/results_matrix and column_names), then hdf5r opening it for writing, as
# writeResults does (mode "r+"). Prints one line per object: file, object, dims, the number of
# finite values and their sum (17 digits), for the caller to compare with what it wrote.
suppressPackageStartupMessages({
  library(hdf5r)
  library(rhdf5)
})
args <- commandArgs(trailingOnly = TRUE)
scalar <- args[1]
show <- function(file, name, x) {
  x <- as.numeric(x)
  ok <- is.finite(x)
  cat(file, name, paste(length(x)), sum(ok), format(sum(x[ok]), digits = 17), "\n", sep = "\t")
}
for (file in args[-1]) {
  values <- rhdf5::h5read(file, sprintf("scalars/%s/values", scalar))
  names <- rhdf5::h5read(file, sprintf("scalars/%s/column_names", scalar))
  if (ncol(values) != length(names)) stop(file, ": subjects are not the columns R sees")
  show(file, "values", values)
  listing <- rhdf5::h5ls(file, recursive = 2)
  analyses <- listing$name[listing$group == "/results"]
  for (analysis in analyses) {
    matrix <- rhdf5::h5read(file, sprintf("results/%s/results_matrix", analysis))
    columns <- rhdf5::h5read(file, sprintf("results/%s/column_names", analysis))
    if (ncol(matrix) != length(columns)) stop(file, ": ", analysis, " has names for ", length(columns))
    show(file, analysis, matrix)
  }
  rhdf5::h5closeAll()
  h5 <- hdf5r::H5File$new(file, mode = "r+")  # writeResults opens the file for writing
  found <- if (h5$exists("results")) sort(h5[["results"]]$names) else character()
  h5$close_all()
  if (!identical(found, sort(analyses))) stop(file, ": hdf5r and rhdf5 see other analyses")
}
