"""Built-in backends (installed as ``atpframework.backends``), registered through the
``atpframework.backends`` entry-point group exactly like third-party backends. Nothing here is
imported by the core; each backend imports its model library lazily."""
