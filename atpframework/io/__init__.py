"""The files atpframework writes and reads: atomic writes and the result file format."""
