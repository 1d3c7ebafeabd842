"""The worker layer: Celery tasks (``tasks``) that load a job by id, run its stages
(``stages``, ``explain_stage``) under a ``runtime.JobRun`` (heartbeat, cancel, progress) and
persist through the store. It imports ``app.jobs``, ``app.queue``, ``app.store``,
``app.settings`` and ``training``; only the command line (and its benchmarks) import it."""
