"""From scores to findings: verification, the diagnostic bound, cost of verified recall, comparisons, plots."""
