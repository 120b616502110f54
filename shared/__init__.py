"""Code that both the API and the workers need: settings, database, job state machine, storage, queue."""
