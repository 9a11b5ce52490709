"""The plan document, metrics, the memory model, and the compiled plan the engine and methods share."""
