"""Pure tensor maths: the QK fix, GradDrop's terms, the statistics of the diagnostic bound."""
