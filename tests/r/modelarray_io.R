# Read and write a GreyArray HDF5 file the way ModelArray does, with R's HDF5 1.10 stack.
#
#   Rscript modelarray_io.R read  FILE.h5 SCALAR OUT.bin
#       values of scalars/SCALAR/values as R sees them (elements x subjects) -> OUT.bin (float32),
#       subject names (attribute column_names, else dataset column_names) -> OUT.bin.names;
#       read with rhdf5 and checked against hdf5r.
#   Rscript modelarray_io.R write FILE.h5 ANALYSIS IN.csv [writeResults|streaming]
#       a results data.frame stored like ModelArray's writeResults (hdf5r: matrix and vlen names,
#       factor columns as codes + lut_forcol<i>) or like its streaming writer (rhdf5: chunked
#       double matrix, fixed-length names).
suppressPackageStartupMessages({
  library(hdf5r)
  library(rhdf5)
})
args <- commandArgs(trailingOnly = TRUE)
file <- args[2]

if (args[1] == "read") {
  path <- sprintf("scalars/%s/values", args[3])
  values <- rhdf5::h5read(file, path)
  names <- rhdf5::h5readAttributes(file, path)$column_names
  if (is.null(names)) names <- rhdf5::h5read(file, sprintf("scalars/%s/column_names", args[3]))
  names <- trimws(as.character(names))
  if (ncol(values) != length(names)) stop("subjects are not the columns R sees")
  h5 <- hdf5r::H5File$new(file, mode = "r")
  again <- h5[[path]]$read()
  h5$close_all()
  if (!identical(dim(again), dim(values)) || !isTRUE(all.equal(again, values))) {
    stop("hdf5r and rhdf5 disagree")
  }
  con <- file(args[4], "wb")
  writeBin(as.vector(values), con, size = 4)
  close(con)
  writeLines(names, paste0(args[4], ".names"))
  cat(dim(values), "\n")
} else if (args[1] == "write") {
  analysis <- args[3]
  df <- read.csv(args[4], check.names = FALSE, stringsAsFactors = FALSE)
  mode <- if (length(args) >= 5) args[5] else "writeResults"
  if (mode == "writeResults") {
    h5 <- hdf5r::H5File$new(file, mode = "a")
    results <- if (h5$exists("results")) h5$open("results") else h5$create_group("results")
    if (results$exists(analysis)) results$link_delete(analysis)
    group <- results$create_group(analysis)
    for (i in seq_along(df)) {
      if (!is.numeric(df[[i]])) {
        levels <- factor(df[[i]])
        df[[i]] <- as.numeric(levels)
        group[[paste0("lut_forcol", i)]] <- levels(levels)
      }
    }
    group[["results_matrix"]] <- as.matrix(df)
    group[["column_names"]] <- as.character(colnames(df))
    h5$close_all()
  } else {
    matrix <- as.matrix(df)
    group <- sprintf("results/%s", analysis)
    if (!("results" %in% rhdf5::h5ls(file, recursive = FALSE)$name)) {
      rhdf5::h5createGroup(file, "results")
    }
    rhdf5::h5createGroup(file, group)
    rhdf5::h5createDataset(file, paste0(group, "/results_matrix"), dims = dim(matrix),
                           storage.mode = "double", chunk = c(min(1000, nrow(matrix)), ncol(matrix)),
                           level = 4)
    rhdf5::h5write(matrix, file, paste0(group, "/results_matrix"))
    rhdf5::h5write(colnames(df), file, paste0(group, "/column_names"))
    rhdf5::h5closeAll()
  }
} else {
  stop("usage: modelarray_io.R read|write ...")
}
