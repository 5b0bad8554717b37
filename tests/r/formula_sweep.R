# The formula sweep's reference (tests/test_formula_sweep.py): every formula fitted with R's lm
# as ModelArray.lm fits it (modelarray_lm.R), on one cohort, in one R process.
#   Rscript formula_sweep.R PHENOTYPES.csv VALUES.csv FORMULAS.txt OUT_DIR
# The phenotypes are read as a ModelArray user reads them (read.csv); the ordered factor ograde
# is made from grade as ModelArray's gen_gamFormula_fxSmooth makes one (reference "high" first,
# then the other levels in their order of appearance). OUT_DIR/<i>.csv: the results of formula
# i (1-based line), or OUT_DIR/<i>.error: R's error message. splines is attached, as a user
# writing ns() or bs() without splines:: has it attached.
suppressPackageStartupMessages(library(splines))
args <- commandArgs(trailingOnly = TRUE)
here <- dirname(sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE)))
source(file.path(here, "modelarray_lm.R"))
phen <- read.csv(args[1], check.names = FALSE)
groups <- unique(phen$grade)
groups <- groups[groups != "high"]
phen$ograde <- ordered(phen$grade, levels = c("high", groups))
values <- as.matrix(read.csv(args[2]))
formulas <- readLines(args[3])
for (i in seq_along(formulas)) {
  result <- tryCatch(modelarray_lm(phen, values, as.formula(paste("y ~", formulas[i]))),
                     error = function(e) conditionMessage(e))
  if (is.character(result)) {
    writeLines(result, file.path(args[4], paste0(i, ".error")))
  } else {
    path <- file.path(args[4], paste0(i, ".csv"))  # names quoted: they hold commas
    writeLines(paste0('"', gsub('"', '""', names(result)), '"', collapse = ","), path)
    write.table(format(result, digits = 17), path, sep = ",", row.names = FALSE,
                col.names = FALSE, quote = FALSE, append = TRUE)
  }
}
