# Reference results for greyarray fit-lmm, computed element by element with lmerTest::lmer (lme4's
# fit, lmerTest's Satterthwaite t tests) the way one would through ModelArray.wrap, with
# ModelArray's element threshold (more than max(10, 0.2 x rows) finite values).
#   Rscript lmm_reference.R PHENOTYPES.csv VALUES.csv "FORMULA" REML OUT.csv [tight]
# VALUES.csv: one row per observation (same order as PHENOTYPES.csv), one column per element,
# NA for missing values. REML: TRUE or FALSE. With "tight", lme4's optimizer (nloptwrap's
# BOBYQA) runs with tolerances 1e-14 instead of lme4's 1e-8, so the numbers are those of the
# optimum itself (lme4's default stops about 1e-5 short of it in theta, which moves standard
# errors by ~1e-6 relative); without it, lmer's defaults (what a user gets).
# OUT.csv: one row per element, fit-lmm's column names and order; model.converged is 1 where
# lme4 gave no convergence warning; lme4.criterion is lme4's REML criterion or deviance.
suppressMessages(library(lmerTest))
args <- commandArgs(trailingOnly = TRUE)
phen <- read.csv(args[1], stringsAsFactors = FALSE)
values <- as.matrix(read.csv(args[2]))
formula <- as.formula(args[3])
reml <- as.logical(args[4])
control <- if (length(args) > 5 && args[6] == "tight") {
  lmerControl(optimizer = "nloptwrap",
              optCtrl = list(xtol_abs = 1e-14, ftol_abs = 1e-14, xtol_rel = 1e-14, maxeval = 1e6))
} else {
  lmerControl()
}
threshold <- max(nrow(phen) * 0.2, 10)
clean <- function(x) sub("^\\(Intercept\\)$", "Intercept", x)
rows <- list()
for (j in seq_len(ncol(values))) {
  y <- values[, j]
  valid <- is.finite(y)
  dat <- phen[valid, , drop = FALSE]
  dat$y <- y[valid]
  out <- c(element_id = j - 1)
  fit <- if (sum(valid) > threshold) {
    tryCatch(suppressMessages(suppressWarnings(
      lmer(formula, data = dat, REML = reml, control = control))), error = function(e) NULL)
  } else NULL
  if (!is.null(fit)) {
    co <- summary(fit)$coefficients
    terms <- clean(rownames(co))
    for (i in seq_along(terms)) {
      out[paste0(terms[i], c(".estimate", ".std.error", ".df", ".statistic", ".p.value"))] <-
        co[i, c("Estimate", "Std. Error", "df", "t value", "Pr(>|t|)")]
    }
    vc <- VarCorr(fit)
    for (g in names(vc)) {
      sd <- attr(vc[[g]], "stddev")
      cor <- attr(vc[[g]], "correlation")
      coefs <- clean(names(sd))
      out[paste0(g, ".sd.", coefs)] <- sd
      if (length(sd) > 1) for (a in 1:(length(sd) - 1)) for (b in (a + 1):length(sd)) {
        out[paste0(g, ".cor.", coefs[a], ".", coefs[b])] <- cor[b, a]
      }
    }
    out["residual.sd"] <- sigma(fit)
    ll <- logLik(fit)
    out["model.logLik"] <- as.numeric(ll)
    out["model.AIC"] <- AIC(fit)
    out["model.BIC"] <- BIC(fit)
    out["model.nobs"] <- nobs(fit)
    ng <- ngrps(fit)
    out[paste0("model.ngroups.", names(ng))] <- ng
    out["model.singular"] <- as.numeric(isSingular(fit))
    messages <- fit@optinfo$conv$lme4$messages
    messages <- messages[!grepl("singular", messages)]
    out["model.converged"] <- as.numeric(length(messages) == 0 && fit@optinfo$conv$opt == 0)
    out["lme4.criterion"] <- if (reml) REMLcrit(fit) else deviance(fit)
  }
  rows[[j]] <- out
}
columns <- names(rows[[which.max(lengths(rows))]])
table <- t(sapply(rows, function(r) { x <- setNames(rep(NaN, length(columns)), columns);
  x[names(r)] <- r; x }))
table <- as.data.frame(table, check.names = FALSE)
for (p in grep("\\.p\\.value$", columns, value = TRUE)) {
  table[[paste0(p, ".fdr")]] <- p.adjust(table[[p]], method = "fdr")
}
write.csv(format(table, digits = 17), args[5], row.names = FALSE, quote = FALSE)
