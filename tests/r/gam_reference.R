# Reference results for greyarray fit-gam: mgcv::gam element by element, the way ModelArray.gam
# runs it (its subject thresholds, broom::tidy/glance and summary.gam statistics, its column
# names), plus GreyArray's signed changed-R-squared columns.
#   Rscript gam_reference.R PHENOTYPES.csv VALUES.csv "y ~ RHS" METHOD FULL CHANGED OUT.csv [ORDERED]
# VALUES.csv: one row per subject (same order as PHENOTYPES.csv), one column per element, NA for
# missing values. METHOD: REML or GCV.Cp. FULL: 1 for full.outputs, 0 for ModelArray's defaults.
# CHANGED: index of the right-hand-side term for changed.rsq.term.index, 0 for none.
# ORDERED: COLUMN=REFERENCE makes that column an ordered factor, the reference level first, then
# the others in their order of appearance (as ModelArray's gen_gamFormula_fxSmooth makes one).
# Column order: element_id, smooth terms (statistics term by term), parametric terms, model
# statistics, <term>.delta.adj.rsq, <term>.partial.rsq, their .signed versions (sign of the mean
# first derivative of the fitted smooth, by central differences, for a term of one covariate
# fitted as one smooth; NaN otherwise), then the FDR columns. Names as ModelArray.gam writes
# them: s(age) -> s_age, s(age):osexM -> s_age_BYosexM, ti(age,x2) -> ti_age_x2; the changed
# term's prefix as ModelArray.gam makes it (s(age, by = osex) -> s_age_BYosex).
# tests/r/gam_fixtures.sh runs it for every stored case.
suppressMessages({
  library(mgcv)
  library(broom)
})
args <- commandArgs(trailingOnly = TRUE)
phen <- read.csv(args[1])
if (length(args) > 7) {  # as gen_gamFormula_fxSmooth: the reference, then the rest as they come
  ordered_spec <- strsplit(args[8], "=", fixed = TRUE)[[1]]
  column <- phen[[ordered_spec[1]]]
  groups <- unique(column)
  phen[[ordered_spec[1]]] <- ordered(column, levels = c(ordered_spec[2],
                                                         groups[groups != ordered_spec[2]]))
}
for (column in setdiff(names(phen), "source_file")) {  # text columns are factors (a by= needs one)
  if (is.character(phen[[column]])) phen[[column]] <- factor(phen[[column]])
}
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
  prefix <- changed_label
  if (!is.null(spec)) {  # ModelArray.gam: ti(x,z) -> ti_x_z; s(x, by = o) -> s_x_BYo
    prefix <- paste0(strsplit(changed_label, "[(]")[[1]][1], "_", paste(spec$term, collapse = "_"))
    if (spec$by != "NA") prefix <- paste0(prefix, "_BY", spec$by)
  }
}

smooth_name <- function(label) {  # ModelArray.gam's analyseOneElement.gam
  parts <- strsplit(label, split = "[()]")[[1]]
  name <- paste0(parts[1], "_", parts[2])
  if (length(parts) > 2) name <- paste0(name, "_", paste(parts[3:length(parts)], collapse = ""))
  gsub(",", "_", gsub(":", "BY", name, fixed = TRUE), fixed = TRUE)
}

mean_slope_sign <- function(fit, dat) {  # sign of the mean derivative of the changed smooth
  if (is.null(spec)) {
    return(sign(coef(fit)[[changed_label]]))
  }
  base <- paste0(sub("[(].*", "", changed_label), "(", paste(spec$term, collapse = ","), ")")
  labels <- sapply(fit$smooth, function(s) s$label)
  labels <- if (spec$by == "NA") labels[labels == base] else
    labels[startsWith(labels, paste0(base, ":", spec$by))]
  if (length(spec$term) != 1 || length(labels) != 1) {
    return(NaN)
  }
  var <- spec$term
  h <- 1e-4 * diff(range(dat[[var]]))
  up <- dat
  down <- dat
  up[[var]] <- up[[var]] + h
  down[[var]] <- down[[var]] - h
  f_up <- predict(fit, newdata = up, type = "terms")[, labels]
  f_down <- predict(fit, newdata = down, type = "terms")[, labels]
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
