"""The PostgreSQL server the tests use (``SHOPFLEET_TEST_PG``; default: the local one, trust auth, database ``test``)."""

from __future__ import annotations

import os

PG_ADMIN_URL = os.environ.get("SHOPFLEET_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
