# Reference results for greyarray fit-lm, computed element by element with R's lm() the way
# ModelArray.lm does (defaults: 10 / 0.2 subject thresholds, full outputs, FDR over elements).
#   Rscript lm_reference.R PHENOTYPES.csv VALUES.csv "FORMULA RHS" OUT.csv
# VALUES.csv: one row per subject (same order as PHENOTYPES.csv), one column per element, NA for
# missing values. OUT.csv: one row per element, ModelArray.lm's column names, term-major order,
# then model statistics, then FDR columns (Benjamini-Hochberg, p.adjust "fdr").
args <- commandArgs(trailingOnly = TRUE)
here <- dirname(sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE)))
source(file.path(here, "modelarray_lm.R"))
table <- modelarray_lm(read.csv(args[1]), as.matrix(read.csv(args[2])),
                       as.formula(paste("y ~", args[3])))
write.csv(format(table, digits = 17), args[4], row.names = FALSE, quote = FALSE)
