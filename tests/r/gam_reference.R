# Reference results for greyarray fit-gam: mgcv::gam element by element, the way ModelArray.gam
# runs it (its subject thresholds, broom::tidy/glance and summary.gam statistics, its column
# names), plus GreyArray's signed changed-R-squared columns.
#   Rscript gam_reference.R PHENOTYPES.csv VALUES.csv "y ~ RHS" METHOD FULL CHANGED OUT.csv
# VALUES.csv: one row per subject (same order as PHENOTYPES.csv), one column per element, NA for
# missing values. METHOD: REML or GCV.Cp. FULL: 1 for full.outputs, 0 for ModelArray's defaults.
# CHANGED: index of the right-hand-side term for changed.rsq.term.index, 0 for none.
# Column order: element_id, smooth terms (statistics term by term), parametric terms, model
# statistics, <term>.delta.adj.rsq, <term>.partial.rsq, their .signed versions (sign of the mean
# first derivative of the fitted smooth, by central differences), then the FDR columns.
# tests/r/gam_fixtures.sh runs it for every stored case.
suppressMessages({
  library(mgcv)
  library(broom)
})
args <- commandArgs(trailingOnly = TRUE)
phen <- read.csv(args[1])
values <- as.matrix(read.csv(args[2]))
formula <- as.formula(args[3])
method <- args[4]
full <- args[5] == "1"
changed <- as.integer(args[6])
out_path <- args[7]

smooth_stats <- if (full) c("edf", "ref.df", "statistic", "p.value") else c("statistic", "p.value")
param_stats <- if (full) c("estimate", "std.error", "statistic", "p.value") else
  c("estimate", "statistic", "p.value")
model_stats <- if (full) c("adj.r.squared", "dev.expl", "sp.criterion", "scale", "df", "logLik",
                           "AIC", "BIC", "deviance", "df.residual", "nobs") else "dev.expl"
threshold <- max(nrow(phen) * 0.2, 10)
response <- all.vars(formula)[1]
terms_full <- terms(formula, keep.order = TRUE)
if (changed > 0) {
  reduced <- if (length(labels(terms_full)) == 1) as.formula(paste(response, "~ 1")) else
    formula(drop.terms(terms_full, changed, keep.response = TRUE))
  changed_label <- labels(terms_full)[changed]
  spec <- if (grepl("(", changed_label, fixed = TRUE)) eval(parse(text = changed_label)) else NULL
  prefix <- if (is.null(spec)) changed_label else paste0("s_", paste(spec$term, collapse = "_"))
}

smooth_name <- function(label) {  # ModelArray: s(age) -> s_age
  parts <- strsplit(label, split = "[()]")[[1]]
  paste0(parts[1], "_", parts[2])
}

mean_slope_sign <- function(fit, dat) {  # sign of the mean derivative of the changed smooth
  if (is.null(spec)) {
    return(sign(coef(fit)[[changed_label]]))
  }
  var <- spec$term
  h <- 1e-4 * diff(range(dat[[var]]))
  up <- dat
  down <- dat
  up[[var]] <- up[[var]] + h
  down[[var]] <- down[[var]] - h
  label <- paste0("s(", var, ")")
  f_up <- predict(fit, newdata = up, type = "terms")[, label]
  f_down <- predict(fit, newdata = down, type = "terms")[, label]
  sign(mean((f_up - f_down) / (2 * h)))
}

rows <- list()
for (j in seq_len(ncol(values))) {
  y <- values[, j]
  valid <- is.finite(y)
  out <- c(element_id = j - 1)
  if (sum(valid) > threshold) {
    dat <- phen[valid, , drop = FALSE]
    dat[[response]] <- y[valid]
    fit <- gam(formula, data = dat, method = method)
    st <- tidy(fit, parametric = FALSE)
    pt <- tidy(fit, parametric = TRUE)
    gl <- glance(fit)
    sm <- summary(fit)
    for (i in seq_len(nrow(st))) {
      for (stat in smooth_stats) out[paste0(smooth_name(st$term[i]), ".", stat)] <- st[[stat]][i]
    }
    pt$term[pt$term == "(Intercept)"] <- "Intercept"
    for (i in seq_len(nrow(pt))) {
      for (stat in param_stats) out[paste0(pt$term[i], ".", stat)] <- pt[[stat]][i]
    }
    extra <- list(adj.r.squared = sm$r.sq, dev.expl = sm$dev.expl,
                  sp.criterion = as.numeric(sm$sp.criterion), scale = sm$scale)
    for (stat in model_stats) {
      out[paste0("model.", stat)] <- if (stat %in% names(extra)) extra[[stat]] else gl[[stat]]
    }
    if (changed > 0) {
      red <- gam(reduced, data = dat, method = method)
      sse_full <- sum(fit$residuals^2)
      sse_red <- sum(red$residuals^2)
      delta <- sm$r.sq - summary(red)$r.sq
      partial <- (sse_red - sse_full) / sse_red
      s <- mean_slope_sign(fit, dat)
      out[paste0(prefix, c(".delta.adj.rsq", ".partial.rsq", ".delta.adj.rsq.signed",
                           ".partial.rsq.signed"))] <- c(delta, partial, s * delta, s * partial)
    }
  }
  rows[[j]] <- out
}
columns <- names(rows[[which.max(lengths(rows))]])
table <- t(sapply(rows, function(r) {
  x <- setNames(rep(NaN, length(columns)), columns)
  x[names(r)] <- r
  x
}))
table <- as.data.frame(table, check.names = FALSE)
for (p in grep("\\.p\\.value$", columns, value = TRUE)) {
  table[[paste0(p, ".fdr")]] <- p.adjust(table[[p]], method = "fdr")
}
write.csv(format(table, digits = 17), out_path, row.names = FALSE, quote = FALSE)
