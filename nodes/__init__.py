"""Built-in node types (installed as ``atpframework.nodes``), registered through the
``atpframework.nodes`` entry-point group exactly like third-party node types."""
