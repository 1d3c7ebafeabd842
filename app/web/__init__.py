"""The explorer: the app factory (``main.create_app``), HTML pages (``pages``,
``pages_jobs``), the JSON API (``api``, ``api_search``), rendering (``render``, ``views``),
CSRF and the admin token (``security``) and the in-process inference engine (``engine``).
It imports ``app.jobs``, ``app.queue``, ``app.store``, ``app.settings`` and ``training``,
never ``worker``."""
