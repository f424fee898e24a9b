"""DVC stage entry points, one module per stage: arguments in, library calls, atomic writes out."""
