# ModelArray.lm's per-element fit (analyseOneElement.lm, full outputs), shared by lm_reference.R
# and formula_sweep.R: lm() on the phenotypes with the element's values as the response (a
# missing value drops the subject), only where more than max(10, 0.2 x N) subjects have a finite
# value; broom::tidy's terms (aliased columns left out) with (Intercept) renamed Intercept and
# broom::glance's model statistics; term-major columns, model statistics, then FDR columns.
modelarray_lm <- function(phen, values, formula) {
  threshold <- max(nrow(phen) * 0.2, 10)
  rows <- list()
  for (j in seq_len(ncol(values))) {
    y <- values[, j]
    valid <- is.finite(y)
    dat <- phen
    dat$y <- ifelse(valid, y, NA)
    if (sum(valid) > threshold) {
      fit <- lm(formula, data = dat)
      tidy <- broom::tidy(fit)
      glance <- broom::glance(fit)
      terms <- sub("^\\(Intercept\\)$", "Intercept", tidy$term)
      out <- c(element_id = j - 1)
      for (i in seq_along(terms)) {
        stats <- c("estimate", "std.error", "statistic", "p.value")
        out[paste0(terms[i], ".", stats)] <- unlist(tidy[i, stats])
      }
      for (stat in names(glance)) out[paste0("model.", stat)] <- glance[[stat]]
      rows[[j]] <- out
    } else {
      rows[[j]] <- c(element_id = j - 1)
    }
  }
  columns <- names(rows[[which.max(lengths(rows))]])
  table <- t(sapply(rows, function(r) {
    x <- setNames(rep(NaN, length(columns)), columns)
    x[names(r)] <- r
    x
  }))
  table <- as.data.frame(table, check.names = FALSE)
  for (p in c(grep("\\.p\\.value$", columns, value = TRUE))) {
    table[[paste0(p, ".fdr")]] <- p.adjust(table[[p]], method = "fdr")
  }
  table
}
