# Reference results for greyarray fit-lm, computed element by element with R's lm() the way
# ModelArray.lm does (defaults: 10 / 0.2 subject thresholds, full outputs, FDR over elements).
#   Rscript lm_reference.R PHENOTYPES.csv VALUES.csv "FORMULA RHS" OUT.csv
# VALUES.csv: one row per subject (same order as PHENOTYPES.csv), one column per element, NA for
# missing values. OUT.csv: one row per element, ModelArray.lm's column names, term-major order,
# then model statistics, then FDR columns (Benjamini-Hochberg, p.adjust "fdr").
args <- commandArgs(trailingOnly = TRUE)
phen <- read.csv(args[1])
values <- as.matrix(read.csv(args[2]))
formula <- as.formula(paste("y ~", args[3]))
n_total <- nrow(phen)
threshold <- max(n_total * 0.2, 10)
rows <- list()
for (j in seq_len(ncol(values))) {
  y <- values[, j]
  valid <- is.finite(y)
  dat <- phen[valid, , drop = FALSE]
  dat$y <- y[valid]
  if (sum(valid) > threshold) {
    fit <- lm(formula, data = dat)
    s <- summary(fit)
    co <- coef(s)
    terms <- sub("^\\(Intercept\\)$", "Intercept", rownames(co))
    out <- c(element_id = j - 1)
    for (i in seq_along(terms)) {
      out[paste0(terms[i], c(".estimate", ".std.error", ".statistic", ".p.value"))] <- co[i, ]
    }
    f <- s$fstatistic
    ll <- logLik(fit)
    out["model.r.squared"] <- s$r.squared
    out["model.adj.r.squared"] <- s$adj.r.squared
    out["model.sigma"] <- s$sigma
    out["model.statistic"] <- f[["value"]]
    out["model.p.value"] <- pf(f[["value"]], f[["numdf"]], f[["dendf"]], lower.tail = FALSE)
    out["model.df"] <- f[["numdf"]]
    out["model.logLik"] <- as.numeric(ll)
    out["model.AIC"] <- AIC(fit)
    out["model.BIC"] <- BIC(fit)
    out["model.deviance"] <- deviance(fit)
    out["model.df.residual"] <- df.residual(fit)
    out["model.nobs"] <- nobs(fit)
    rows[[j]] <- out
  } else {
    rows[[j]] <- c(element_id = j - 1)
  }
}
columns <- names(rows[[which.max(lengths(rows))]])
table <- t(sapply(rows, function(r) { x <- setNames(rep(NaN, length(columns)), columns);
  x[names(r)] <- r; x }))
table <- as.data.frame(table, check.names = FALSE)
for (p in c(grep("\\.p\\.value$", columns, value = TRUE))) {
  table[[paste0(p, ".fdr")]] <- p.adjust(table[[p]], method = "fdr")
}
write.csv(format(table, digits = 17), args[4], row.names = FALSE, quote = FALSE)
