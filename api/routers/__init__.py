"""The service's routes, one module per resource: operations, files, jobs, models (with
predictions)."""
