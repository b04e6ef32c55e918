"""Alembic environment: runs on the connection handed in by marketplace_server.db.session.migrate."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from marketplace_server.db.models import Base

target_metadata = Base.metadata
connection = context.config.attributes.get("connection")

if connection is None:
    # `alembic revision --autogenerate` from the command line: a sync engine on the given URL.
    url = context.config.get_main_option("sqlalchemy.url") or "sqlite:///var/alembic.db"
    with create_engine(url).connect() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
