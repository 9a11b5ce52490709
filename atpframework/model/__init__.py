"""How the framework sees a model: sites, the backend and node contracts, the capture primitive, SAE splices."""
