"""ModelArray's statistic names (its ``var.terms`` / ``var.model``), without importing the solvers:
the parsers and the BIDS names need them, and must stay quick to import."""

TERM_STATS = ("estimate", "std.error", "statistic", "p.value")
MODEL_STATS = (
    "r.squared",
    "adj.r.squared",
    "sigma",
    "statistic",
    "p.value",
    "df",
    "logLik",
    "AIC",
    "BIC",
    "deviance",
    "df.residual",
    "nobs",
)
DEFAULT_TERM_STATS = ("estimate", "statistic", "p.value")
DEFAULT_MODEL_STATS = ("adj.r.squared", "p.value")
