# R's reading of formulas, for tests/test_formula.py: deparse, terms.formula, lme4's findbars and
# random-effect blocks, all in one R process.
#   Rscript formula_terms.R CASES.json PHENOTYPES.csv OUT.json
# CASES.json: {"deparse": [expressions], "terms": [formulas], "bars": [formulas]}.
suppressPackageStartupMessages({library(jsonlite); library(lme4)})
args <- commandArgs(trailingOnly = TRUE)
cases <- fromJSON(args[1])
d <- read.csv(args[2])
out <- list()
out$deparse <- lapply(cases$deparse, function(e) deparse(str2lang(e), width.cutoff = 500L))
out$terms <- lapply(cases$terms, function(f) {
  t <- terms(as.formula(f))
  fac <- attr(t, "factors")
  list(labels = attr(t, "term.labels"), intercept = attr(t, "intercept"),
       offset = if (is.null(attr(t, "offset"))) list() else attr(t, "offset") - 1L,
       factors = if (length(fac)) unname(split(fac, col(fac))) else list())
})
ignore <- lmerControl(check.nobs.vs.nlev = "ignore", check.nobs.vs.nRE = "ignore",
                      check.nlev.gtr.1 = "ignore", check.nobs.vs.rankZ = "ignore")
out$bars <- lapply(cases$bars, function(f) {
  lf <- lFormula(as.formula(f), d, control = ignore)
  bars <- findbars(as.formula(f))
  blocks <- lapply(bars, function(b) {
    bl <- lme4:::mkBlist(b, lf$fr, TRUE)
    mm <- model.matrix(eval(substitute(~foo, list(foo = b[[2]]))), lf$fr)
    list(term = deparse1(b), group = deparse1(b[[3]]), levels = levels(bl$ff),
         codes = as.integer(bl$ff) - 1L, columns = bl$cnms, matrix = unname(mm))
  })
  list(rows = as.integer(rownames(lf$fr)) - 1L, fixed = colnames(lf$X), blocks = blocks)
})
write_json(out, args[3], digits = NA, auto_unbox = FALSE)
