"""Pure tensor math: no module walking, no files, no printing."""
