"""Virtual keys: one relay key per application, with budgets and limits.

- :mod:`.model`: fields, secrets, periods, the key object;
- :mod:`.store`, :mod:`.sqlite_store`, :mod:`.redis_store`: the backends;
- :mod:`.service`: a process's cached view, reserve/settle, merge-back;
- :mod:`.admission`: the per-request checks and the settle at the end;
- :mod:`.manage`, :mod:`.admin`, :mod:`.cli`: management over HTTP and shell.

Importing this package imports nothing heavy: the pieces load on use.
"""

ADMIN_PREFIX = b"/relay/admin"  # every path the admin API answers starts so
